(* Kill torture of the hand-off (issue 13) through real Netmcore workers:
   producers allocate stamped blocks (mostly 1..64 pages, whose frees by
   another process go to the owner's inbox; some 65..200, freed through
   the locked path) and pass each one's address to a consumer through a
   ring in a shared mailbox; the consumer verifies the stamps and frees the
   block, so nearly every free is a remote free into a producer's inbox.

   Each batch starts [npairs] producer/consumer pairs (one ring each) as
   Netmcore processes (Netmcore_process.start ~inherit_resources:`All) and
   SIGKILLs [kills] of them at random moments, each replaced by a fresh
   process on the same ring: a producer (its consumer goes on freeing the
   dead producer's blocks into its inbox), a consumer (its producer goes on
   handing it blocks), or a producer and its consumer at once (a free into
   a dying owner's inbox). A consumer marks an entry (negated address)
   before its free and clears it after: its replacement moves an entry
   left marked (freed or not: unknown) to the ring's limbo list.

   Then, with every worker paused between two of its steps: [check] is
   clean; every block a live producer holds (its journal, its entries on
   its ring) is live, intact and overlaps no other; a limbo block still
   live, intact and held by nobody is freed on the dead consumer's behalf;
   [owners] agrees with the live producers' journals to the page and lists
   nothing else but dead workers; [stats] is exact (free = payload - held -
   the dead's pages); allocating [largest_free] until it is 0 obtains
   exactly [free]. Then the batch's workers are all killed, [reclaim_dead]
   frees exactly what [owners] listed, and the whole pool is free and sound.

   $SHMPOOL_TORTURE multiplies the number of batches. Supervised by
   Torture.main (own session, deadline, cleanup of processes and shm). *)

open Torture
module M = Shmpool_netmcore.Netmcore_mempool

let suite = "handoff"
let npairs = 2
let batches = 4 * scale
let pool_pages = 8192
let deadline = 20.0
let ring = 16
let journal = 8
let limbo = 8

(* ----- the mailbox -------------------------------------------------------- *)

(* word 0: the phase; then one slot per worker of a batch; then the rings *)
let phase_run = 0
let phase_pause = 1
let max_workers = 24

(* a worker's slot *)
let s_pid = 0
let s_progress = 1
let s_paused = 2
let s_violations = 3
let s_ooms = 4
let j_base = 5 (* journal: [journal] entries of (addr, size, tag); size 0 = empty *)
let ws = j_base + (3 * journal)
let slot_base k = 1 + (k * ws)

(* a ring: head (producer), tail (consumer), [ring] entries of (addr, size,
   tag, poster slot), then [limbo] entries likewise and their count *)
let e_words = 4
let r_head = 0
let r_tail = 1
let r_entries = 2
let r_limbo = r_entries + (ring * e_words)
let r_nlimbo = r_limbo + (limbo * e_words)
let rs = r_nlimbo + 1
let ring_base r = 1 + (max_workers * ws) + (r * rs)
let mailbox_words = 1 + (max_workers * ws) + (npairs * rs)

(* created by the master before Netmcore.run, inherited by every process *)
let mb = ref (Bigarray.Array1.create Bigarray.int64 Bigarray.c_layout 0)

let api = Torture_mcore.netmcore_api

(* ----- the workers ---------------------------------------------------------- *)

let violation mb base what =
  if get mb (base + s_violations) = 0 then
    prerr_endline (Printf.sprintf "torture handoff worker %d: %s" (Unix.getpid ()) what);
  bump mb (base + s_violations)

let grab addr size = Netsys_mem.grab (Nativeint.of_int addr) size

(* Mostly cache-sized blocks (half of them 1..4 pages), 20 % for the locked path. *)
let pages rng =
  let r = Random.State.int rng 100 in
  if r < 45 then 1 + Random.State.int rng 4
  else if r < 80 then 5 + Random.State.int rng 60
  else 65 + Random.State.int rng 136

(* A worker's loop: steps until killed, pausing when asked. *)
let run_worker step base =
  let mb = !mb in
  set mb (base + s_pid) (Unix.getpid ());
  let k = ref 0 in
  let t = now () in
  (* bounded: a worker left behind by a failed run ends by itself *)
  while now () -. t < 300. do
    if get mb 0 = phase_pause then begin
      set mb (base + s_paused) 1;
      while get mb 0 = phase_pause && now () -. t < 300. do Unix.sleepf 0.0005 done;
      set mb (base + s_paused) 0
    end
    else begin
      incr k;
      (try step !k
       with e ->
         violation mb base ("exception " ^ Printexc.to_string e);
         Unix.sleepf 0.001);
      bump mb (base + s_progress)
    end
  done;
  false

let producer (pool, k, r, tag, seed) =
  let mb = !mb and base = slot_base k and rb = ring_base r in
  let api = api pool and rng = Random.State.make [| seed |] in
  let seq = ref 0 in
  let jw s i = base + j_base + (3 * s) + i in
  let verify_own s =
    let m = grab (get mb (jw s 0)) (get mb (jw s 1)) in
    if not (intact m (Int64.of_int (get mb (jw s 2)))) then violation mb base "an own block was overwritten";
    m
  in
  let free_own s =
    let m = verify_own s in
    set mb (jw s 1) 0;
    api.free m
  in
  let step _ =
    let s = Random.State.int rng journal in
    if get mb (jw s 1) = 0 then begin
      let n = pages rng in
      match api.alloc (n * ps) with
      | m ->
          incr seq;
          let t = (tag lsl 24) lor (!seq land 0xffffff) in
          stamp m (Int64.of_int t);
          set mb (jw s 0) (Nativeint.to_int (Netsys_mem.memory_address m));
          set mb (jw s 2) t;
          set mb (jw s 1) (n * ps)
      | exception e when api.is_oom e -> bump mb (base + s_ooms)
    end
    else if Random.State.int rng 100 < 85 then begin
      let head = get mb (rb + r_head) in
      if head - get mb (rb + r_tail) < ring then begin
        ignore (verify_own s);
        let e = rb + r_entries + (head mod ring * e_words) in
        set mb e (get mb (jw s 0));
        set mb (e + 1) (get mb (jw s 1));
        set mb (e + 2) (get mb (jw s 2));
        set mb (e + 3) k;
        set mb (rb + r_head) (head + 1);
        set mb (jw s 1) 0
      end
      else free_own s
    end
    else free_own s
  in
  run_worker step base

let producer_fork, producer_join = Netmcore_process.def_process producer

let consumer (pool, k, r) =
  let mb = !mb and base = slot_base k and rb = ring_base r in
  let api = api pool in
  (* an entry a killed predecessor marked: freed or not, nobody knows *)
  let tail = get mb (rb + r_tail) in
  let e = rb + r_entries + (tail mod ring * e_words) in
  if tail < get mb (rb + r_head) && get mb e = 0 then
    (* freed and cleared, the tail not yet moved on *)
    set mb (rb + r_tail) (tail + 1)
  else if tail < get mb (rb + r_head) && get mb e < 0 then begin
    let n = get mb (rb + r_nlimbo) in
    if n >= limbo then violation mb base "limbo full"
    else begin
      let l = rb + r_limbo + (n * e_words) in
      set mb l (-get mb e);
      for i = 1 to 3 do set mb (l + i) (get mb (e + i)) done;
      set mb (rb + r_nlimbo) (n + 1)
    end;
    set mb (rb + r_tail) (tail + 1)
  end;
  let step _ =
    let tail = get mb (rb + r_tail) in
    if tail < get mb (rb + r_head) then begin
      let e = rb + r_entries + (tail mod ring * e_words) in
      let addr = get mb e and size = get mb (e + 1) and tag = get mb (e + 2) in
      let m = grab addr size in
      if not (intact m (Int64.of_int tag)) then violation mb base "a handed-off block was overwritten";
      set mb e (-addr);
      api.free m;
      set mb e 0;
      set mb (rb + r_tail) (tail + 1)
    end
    else Unix.sleepf 0.0001
  in
  run_worker step base

let consumer_fork, consumer_join = Netmcore_process.def_process consumer

(* ----- the batches ------------------------------------------------------------ *)

type result = {
  kills : int;
  ops : int;
  ooms : int;
  orphans : int;
  reclaimed : int;
  recoveries : int;
  problems : string list;
}

type role = Producer | Consumer

let first (pool, seed) =
  let rng = Random.State.make [| seed |] in
  let mb = !mb in
  let sp = Shmpool_netmcore.shmpool pool in
  let payload = (Shmpool.stats sp).payload in
  let kills = ref 0 and ops = ref 0 and ooms = ref 0 and orphans = ref 0 and reclaimed = ref 0 in
  let problems = ref [] in
  let note fmt = Printf.ksprintf (fun s -> if List.length !problems < 8 then problems := s :: !problems) fmt in
  let ntags = ref 0 in
  let run_batch batch =
    Bigarray.Array1.fill mb 0L;
    (* per worker index: role, ring, Netmcore id, alive *)
    let workers = ref [] in
    let nworkers = ref 0 in
    let start role r =
      let k = !nworkers in
      if k >= max_workers then failwith "too many workers in a batch";
      incr nworkers;
      incr ntags;
      let id =
        match role with
        | Producer ->
            `P
              (Netmcore_process.start ~inherit_resources:`All producer_fork
                 (pool, k, r, !ntags, Random.State.bits rng))
        | Consumer -> `C (Netmcore_process.start ~inherit_resources:`All consumer_fork (pool, k, r))
      in
      workers := (k, role, r, id) :: !workers;
      k
    in
    let pid k = get mb (slot_base k + s_pid) in
    let progress k = get mb (slot_base k + s_progress) in
    let live = ref [] and dead = ref [] in
    let wait_for what f =
      let t = now () in
      while (not (f ())) && now () -. t < deadline do sleep 0.0002 done;
      if not (f ()) then failwith (Printf.sprintf "batch %d: %s: not within %.0f s" batch what deadline)
    in
    let progressed ks n =
      let base = List.map (fun k -> (k, progress k)) ks in
      wait_for "the workers' progress" (fun () -> List.for_all (fun (k, p0) -> progress k >= p0 + n) base)
    in
    let kill_worker k =
      wait_for "a worker's start" (fun () -> pid k > 0);
      kill (pid k) Sys.sigkill;
      if wait_gone (pid k) then incr kills else note "batch %d: worker %d survived SIGKILL" batch (pid k);
      live := List.filter (( <> ) k) !live;
      dead := k :: !dead
    in
    let role_of k = List.find_map (fun (k', role, r, _) -> if k = k' then Some (role, r) else None) !workers in
    for r = 0 to npairs - 1 do
      live := start Producer r :: start Consumer r :: !live
    done;
    progressed !live 20;
    let nkills = 3 + Random.State.int rng 4 in
    for _ = 1 to nkills do
      let k = List.nth !live (Random.State.int rng (List.length !live)) in
      let role, r = Option.get (role_of k) in
      progressed [ k ] (Random.State.int rng 300);
      sleep (Random.State.float rng 0.0005);
      if Random.State.int rng 4 = 0 then begin
        (* the pair: the producer first, then its consumer, maybe in the
           middle of a free into the dying producer's inbox *)
        let on_ring role = List.find (fun k -> role_of k = Some (role, r)) !live in
        let p = on_ring Producer and c = on_ring Consumer in
        kill_worker p;
        kill_worker c;
        live := start Producer r :: start Consumer r :: !live
      end
      else begin
        kill_worker k;
        live := start role r :: !live
      end;
      progressed !live 20
    done;
    (* pause everyone between two steps, and look *)
    set mb 0 phase_pause;
    wait_for "the workers pausing" (fun () -> List.for_all (fun k -> get mb (slot_base k + s_paused) = 1) !live);
    (match Shmpool.check sp with [] -> () | l -> note "batch %d: check: %s" batch (String.concat "; " l));
    let is_live k = List.mem k !live in
    (* (addr, size, tag, poster) held by live producers *)
    let held = ref [] in
    List.iter
      (fun k ->
        if fst (Option.get (role_of k)) = Producer then
          for s = 0 to journal - 1 do
            let w i = get mb (slot_base k + j_base + (3 * s) + i) in
            if w 1 > 0 then held := (w 0, w 1, w 2, k) :: !held
          done)
      !live;
    let uncertain = ref [] in
    for r = 0 to npairs - 1 do
      let rb = ring_base r in
      let entry e = (get mb e, get mb (e + 1), get mb (e + 2), get mb (e + 3)) in
      for i = get mb (rb + r_tail) to get mb (rb + r_head) - 1 do
        let ((a, sz, t, poster) as x) = entry (rb + r_entries + (i mod ring * e_words)) in
        if a < 0 then uncertain := (-a, sz, t, poster) :: !uncertain
        else if a > 0 && is_live poster then held := x :: !held
      done;
      for i = 0 to get mb (rb + r_nlimbo) - 1 do
        uncertain := entry (rb + r_limbo + (i * e_words)) :: !uncertain
      done
    done;
    List.iter
      (fun (a, sz, t, _) ->
        if not (intact (grab a sz) (Int64.of_int t)) then note "batch %d: a held block was overwritten" batch;
        match Shmpool.size_at_addr sp (Nativeint.of_int a) with
        | n when n = sz -> ()
        | n -> note "batch %d: a held block of %d bytes has size %d" batch sz n
        | exception Not_found -> note "batch %d: a held block of %d bytes is not allocated" batch sz)
      !held;
    let sorted = List.sort compare !held in
    let rec overlaps = function
      | (a, sz, _, _) :: ((b, _, _, _) :: _ as rest) -> a + sz > b || overlaps rest
      | _ -> false
    in
    if overlaps sorted then note "batch %d: held blocks overlap" batch;
    (* a block a killed consumer was freeing: still live, intact, held by
       nobody, and its poster alive: an orphan, freed on its behalf *)
    List.iter
      (fun (a, sz, t, poster) ->
        if is_live poster && not (List.exists (fun (b, _, _, _) -> b = a) !held) then
          match Shmpool.size_at_addr sp (Nativeint.of_int a) with
          | n when n = sz && intact (grab a sz) (Int64.of_int t) ->
              Shmpool.free sp (grab a sz);
              incr orphans
          | _ -> ()
          | exception Not_found -> ())
      !uncertain;
    let owners = Shmpool.owners sp in
    let dead_pids = List.map pid !dead in
    let dead_pages = ref 0 in
    List.iter
      (fun (o : Shmpool.owner) ->
        match List.find_opt (fun k -> pid k = o.pid) !live with
        | Some k ->
            let mine = List.filter (fun (_, _, _, p) -> p = k) !held in
            let pages = List.fold_left (fun a (_, sz, _, _) -> a + (sz / ps)) 0 mine in
            if (o.pages, o.blocks) <> (pages, List.length mine) then
              note "batch %d: live pid %d owns %d pages in %d blocks, holds %d in %d" batch o.pid o.pages o.blocks
                pages (List.length mine)
        | None ->
            if o.pages > 0 then
              if List.mem o.pid dead_pids && not o.alive then dead_pages := !dead_pages + o.pages
              else note "batch %d: pid %d (alive %b) holds %d pages, killed in no batch" batch o.pid o.alive o.pages)
      owners;
    List.iter
      (fun k ->
        if not (List.exists (fun (o : Shmpool.owner) -> o.pid = pid k) owners) then
          if List.exists (fun (_, _, _, p) -> p = k) !held then note "batch %d: live pid %d not in owners" batch (pid k))
      !live;
    let held_pages = List.fold_left (fun a (_, sz, _, _) -> a + (sz / ps)) 0 !held in
    let s = Shmpool.stats sp in
    if s.free <> payload - ((held_pages + !dead_pages) * ps) then
      note "batch %d: stats: %d pages free; payload %d, live producers hold %d, the dead %d" batch (s.free / ps)
        (payload / ps) held_pages !dead_pages;
    (* greedy: allocating largest_free until it is 0 obtains free *)
    let free0 = s.free in
    let rec greedy acc got n =
      let c = (Shmpool.stats sp).largest_free in
      if c = 0 || n > pool_pages then (acc, got)
      else
        match M.alloc_mem pool c with
        | m -> greedy (m :: acc) (got + c) (n + 1)
        | exception M.Out_of_pool_memory ->
            note "batch %d: greedy: alloc of largest_free %d refused" batch c;
            (acc, got)
    in
    let blocks, got = greedy [] 0 0 in
    List.iter (M.free_mem pool) blocks;
    Shmpool.flush_cache sp;
    if got <> free0 then note "batch %d: greedy allocation obtained %d bytes of %d free" batch got free0;
    (* the batch ends: every worker killed *)
    List.iter kill_worker !live;
    List.iter
      (fun (k, _, _, id) ->
        ops := !ops + progress k;
        ooms := !ooms + get mb (slot_base k + s_ooms);
        if get mb (slot_base k + s_violations) > 0 then note "batch %d: worker %d reported violations" batch k;
        let r =
          match id with
          | `P id -> Netmcore_process.join producer_join id
          | `C id -> Netmcore_process.join consumer_join id
        in
        if r <> None then note "batch %d: a killed worker returned a result" batch)
      !workers;
    let owners = Shmpool.owners sp in
    let dead_pages =
      List.fold_left (fun a (o : Shmpool.owner) -> if o.alive then a else a + o.pages) 0 owners
    in
    let before = Shmpool.stats sp in
    let r = Shmpool.reclaim_dead sp in
    reclaimed := !reclaimed + r.pages_freed;
    if r.pages_freed <> dead_pages || r.pages_freed * ps <> payload - before.free then
      note "batch %d: reclaim_dead freed %d pages; owners listed %d dead, %d were not free" batch r.pages_freed
        dead_pages ((payload - before.free) / ps);
    let s = Shmpool.stats sp in
    if s.free <> payload || s.largest_free <> payload || s.live_blocks <> 0 then
      note "batch %d: after reclaim_dead %d of %d pages free (largest run %d), %d live blocks" batch (s.free / ps)
        (payload / ps) (s.largest_free / ps) s.live_blocks;
    match Shmpool.check sp with [] -> () | l -> note "batch %d: check at the end: %s" batch (String.concat "; " l)
  in
  (try
     for batch = 1 to batches do
       run_batch batch
     done
   with e -> note "first process: %s" (Printexc.to_string e));
  {
    kills = !kills;
    ops = !ops;
    ooms = !ooms;
    orphans = !orphans;
    reclaimed = !reclaimed;
    recoveries = (Shmpool.stats sp).recoveries;
    problems = List.rev !problems;
  }

let first_fork, first_join = Netmcore_process.def_process first

let run () =
  let t0 = now () in
  mb := mailbox mailbox_words;
  let _pool, result, log =
    Torture_mcore.run_first ~name:"torture-handoff" ~pool_bytes:(pool_pages * ps) first_fork first_join seed
  in
  let ok, line =
    match result with
    | None -> (false, Printf.sprintf "%d batches, the first process returned nothing (seed %d)" batches seed)
    | Some r ->
        List.iter (fun m -> prerr_endline ("torture " ^ suite ^ ": " ^ m)) r.problems;
        ( r.problems = [],
          Printf.sprintf
            "%d batches, %d kills, %d violations (%d orphans freed, %d pages reclaimed, %d recoveries, %d ops, %d \
             OOMs, %.1f s, seed %d)"
            batches r.kills (List.length r.problems) r.orphans r.reclaimed r.recoveries r.ops r.ooms (now () -. t0)
            seed )
  in
  if not ok then Torture_mcore.show_log log;
  report ~suite "%s" line;
  ok

let () = main ~suite run
