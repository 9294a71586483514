(* Issue 9, item 3, through real Netmcore workers: the caches of processes
   that no longer exist must not go missing from the pool's accounting.

   The master creates a drop-in pool before Netmcore.run; the first process
   runs batches of kills: two workers (Netmcore_process.start
   ~inherit_resources:`All) churn stamped blocks of 1..64 pages and some
   longer (so their frees go to their caches), one of them is SIGKILLed at
   a random moment and a new one takes its place, until the batch's kills
   are done and its last workers are killed too. With every worker of the
   batch dead, the first process checks:
   - right after its [stats], [debug_info]'s "cached in processes" lists
     no block of a dead worker (debug_info does not say whose a cached
     block is: with every worker dead, a block it lists is a dead worker's
     unless it is one of the parked worker's below, which publishes their
     addresses);
   - the greedy check: allocating [stats]' contiguous again and again until
     it is 0 obtains exactly the [free] of before the loop;
   - [Shmpool.reclaim_dead] frees the live blocks the killed workers held
     (as [Shmpool.owners] listed them), and then the whole pool is free.
   During the last batch a live worker holds blocks in its cache (it freed
   them and is parked on a mailbox word, not exiting): the cached list must
   then be exactly its blocks. In that batch the greedy check runs after
   reclaim_dead, with the parked worker's cache filled again, so that only
   a live cache is in the way: it must still obtain [free], taking that
   cache back.

   100 kills by default; $SHMPOOL_TORTURE multiplies that (10 gives the
   issue's 1000). The run is supervised by Torture.main: its own session,
   a deadline, and every process and shm object left is killed and removed
   whatever happened. *)

open Torture
module M = Shmpool_netmcore.Netmcore_mempool

let suite = "worker-kills"
let nworkers = 2
let kills_per_batch = 10
let batches = 10 * scale
let pool_pages = 8192
let deadline = 20.0

(* The parked worker's blocks (pages): 1..64 and one longer; 210 pages in
   all, well within what one process caches (a 16th of the pool). *)
let parker_pages = [ 1; 2; 3; 4; 7; 16; 33; 64; 80 ]

(* mailbox: one slot per churning worker (Torture's layout), then the
   parker's words: pid; the fill asked for (a generation number); the
   fill done (that number once its blocks are freed into its cache, -1 if
   it failed); release; number of blocks, then (address, size) of each *)
let parker_base = nworkers * slot_words
let p_pid = 0
let p_fill = 1
let p_filled = 2
let p_release = 3
let p_count = 4
let p_blocks = 5
let mailbox_words = parker_base + p_blocks + (2 * List.length parker_pages)

(* created by the master before Netmcore.run, inherited by every process *)
let mb = ref (Bigarray.Array1.create Bigarray.int64 Bigarray.c_layout 0)

let api = Torture_mcore.netmcore_api

(* A churning worker: Torture's stamped alloc/free loop, until killed. *)
let churner (pool, slot, tag, s) =
  churn (api pool) !mb (slot * slot_words) ~rng:(Random.State.make [| s |]) ~ops:max_int ~tag;
  false

let churner_fork, churner_join = Netmcore_process.def_process churner

(* The parked worker: allocates and frees its blocks (into its cache),
   publishes them, and waits (bounded) until released, filling its cache
   again when asked. OCamlnet's own def_process: nothing gives its cache
   back before it exits. *)
let parker pool =
  let mb = !mb in
  let b = parker_base in
  set mb (b + p_pid) (Unix.getpid ());
  let fill gen =
    let ms = List.map (fun n -> M.alloc_mem pool (n * ps)) parker_pages in
    List.iteri
      (fun i m ->
        Bigarray.Array1.fill m 'p';
        set mb (b + p_blocks + (2 * i)) (Nativeint.to_int (Netsys_mem.memory_address m));
        set mb (b + p_blocks + (2 * i) + 1) (Bigarray.Array1.dim m))
      ms;
    List.iter (M.free_mem pool) ms;
    set mb (b + p_count) (List.length ms);
    set mb (b + p_filled) gen
  in
  try
    let t = now () in
    while get mb (b + p_release) = 0 && now () -. t < 120. do
      let gen = get mb (b + p_fill) in
      if gen > get mb (b + p_filled) then fill gen else sleep 0.001
    done;
    true
  with e ->
    prerr_endline ("parker: " ^ Printexc.to_string e);
    set mb (b + p_filled) (-1);
    false

let parker_fork, parker_join = Netmcore_process.def_process parker

(* [(offset, size)] of a list of debug_info, e.g. "cached in processes". *)
let listed what d =
  let k = what ^ " (offs->bsize): {" in
  match Str.search_forward (Str.regexp_string k) d 0 with
  | exception Not_found -> failwith (Printf.sprintf "debug_info lists no %S" what)
  | i ->
      let i = i + String.length k in
      let s = String.sub d i (String.index_from d i '}' - i) in
      if s = "" then []
      else List.map (fun a -> Scanf.sscanf a "%d->%d" (fun o n -> (o, n))) (String.split_on_char ',' s)

(* Whether cached entry [(addr, size)] is the parker's, [p] being its
   blocks: one of them (cached as it is), or a run that holds one of its
   longer blocks (the large cache merges a freed long block with the runs
   it caches next to it, such as the spare run that came with its
   allocation: rust/src/large_cache.rs), or that spare run itself, which
   starts where the long block ends and is a whole number of blocks of its
   length (merging waits for an alloc that needs it). *)
let parkers p (o, n) =
  let ends o n = Nativeint.add o (Nativeint.of_int n) in
  List.mem (o, n) p
  || List.exists
       (fun (o', n') ->
         n' > 64 * ps && ((o <= o' && ends o' n' <= ends o n) || (o = ends o' n' && n mod n' = 0)))
       p

(* Whether every block of the parker's is cached, as it is or in a run. *)
let all_cached c p = List.for_all (fun b -> List.exists (parkers [ b ]) c) p

(* The address of the pool's mapping (debug_info's offsets are from it). *)
let base pool =
  match (Netmcore.get_resource pool)#repr with
  | `Posix_shm_preallocated_sc (_, mem, _) -> Netsys_mem.memory_address mem
  | _ -> failwith "the pool is no preallocated shm object"

(* the first 8 findings of a kind, and how many more *)
let first8 = function
  | a :: b :: c :: d :: e :: f :: g :: h :: (_ :: _ as more) ->
      [ a; b; c; d; e; f; g; h; Printf.sprintf "(and %d more)" (List.length more) ]
  | l -> l

let bytes l = List.fold_left (fun a (_, n) -> a + n) 0 l

type greedy = { free : int; got : int; refused : int option (* a contiguous alloc_mem refused *) }

type result = {
  kills : int;
  ops : int;
  reclaimed : int;  (** pages reclaim_dead freed *)
  recoveries : int;  (** pool repairs after a worker killed mid-operation *)
  ooms : int;
  dead_cached_batches : int;
  harness : string list;  (** the run itself: kills, stamps, setup *)
  dead_cached : string list;  (** dead workers' blocks listed as cached after stats *)
  greedy_dead : (int * greedy) list;  (** per batch, after the kills *)
  greedy_live : greedy option;  (** last batch, with the parked worker's cache *)
  parker_cached : string list;  (** the parked worker's blocks were not (all) in its cache *)
  reclaim : string list;
  final : string list;
}

let first (pool, seed) =
  let rng = Random.State.make [| seed |] in
  let mb = !mb in
  let sp = Shmpool_netmcore.shmpool pool in
  let payload = (Shmpool.stats sp).payload in
  let kills = ref 0 and ops = ref 0 and ooms = ref 0 and reclaimed = ref 0 in
  let harness = ref [] and dead_cached = ref [] and greedy_dead = ref [] and greedy_live = ref None in
  let parker_cached = ref [] and reclaim = ref [] and final = ref [] in
  let note l fmt = Printf.ksprintf (fun s -> l := s :: !l) fmt in
  (* the Netmcore ids of the churning workers, by mailbox slot *)
  let running = Array.make nworkers None in
  let parker_id = ref None in
  let pid_of i = get mb ((i * slot_words) + w_pid) in
  let kill_all () =
    Array.iteri
      (fun i w ->
        if w <> None && pid_of i > 0 then kill (pid_of i) Sys.sigkill;
        running.(i) <- None)
      running;
    set mb (parker_base + p_release) 1
  in
  let mapping = base pool in
  let cached () =
    List.map (fun (o, n) -> (Nativeint.add mapping (Nativeint.of_int o), n))
      (listed "cached in processes" (M.debug_info pool))
  in
  let ntags = ref 0 in
  let start i =
    let b = i * slot_words in
    for k = 0 to slot_words - 1 do set mb (b + k) 0 done;
    incr ntags;
    running.(i) <-
      Some
        (Netmcore_process.start ~inherit_resources:`All churner_fork
           (pool, i, Int64.of_int !ntags, Random.State.bits rng))
  in
  (* SIGKILL the worker of slot [i] at a random moment of its churn, wait
     until it is gone; its pid *)
  let kill_at_random batch i =
    let b = i * slot_words in
    let target = 1 + Random.State.int rng 400 in
    let t = now () in
    while get mb (b + w_progress) < target && now () -. t < deadline do sleep 0.0002 done;
    if get mb (b + w_progress) < target then note harness "batch %d: a worker did not get going" batch;
    sleep (Random.State.float rng 0.001);
    let pid = pid_of i in
    (* (kill 0 would signal our whole process group) *)
    if pid <= 0 then failwith (Printf.sprintf "batch %d: a worker never started" batch);
    kill pid Sys.sigkill;
    if wait_gone pid then incr kills else note harness "batch %d: worker %d survived SIGKILL" batch pid;
    ops := !ops + get mb (b + w_progress);
    ooms := !ooms + get mb (b + w_ooms);
    if get mb (b + w_violations) > 0 then
      note harness "batch %d: worker %d reported a violation (see above)" batch pid;
    (match running.(i) with
     | Some id ->
         if Netmcore_process.join churner_join id <> None then
           note harness "batch %d: a killed worker returned a result" batch
     | None -> ());
    running.(i) <- None;
    pid
  in
  (* allocate contiguous until it is 0; everything obtained is freed again *)
  let greedy () =
    let _, free, _ = M.stats pool in
    let rec go held got n =
      let _, _, c = M.stats pool in
      if c = 0 || n > pool_pages then (held, got, None)
      else
        match M.alloc_mem pool c with
        | m -> go (m :: held) (got + c) (n + 1)
        | exception M.Out_of_pool_memory -> (held, got, Some c)
    in
    let held, got, refused = go [] 0 0 in
    List.iter (M.free_mem pool) held;
    { free; got; refused }
  in
  (* the parker's cache filled (again), as fill number [gen] *)
  let parker_fill gen =
    set mb (parker_base + p_fill) gen;
    let t = now () in
    while get mb (parker_base + p_filled) <> gen && get mb (parker_base + p_filled) >= 0
          && now () -. t < deadline do
      sleep 0.0005
    done;
    if get mb (parker_base + p_filled) <> gen then failwith "the parked worker did not fill its cache"
  in
  let parker_blocks () =
    let b = parker_base in
    List.init (get mb (b + p_count)) (fun k ->
        (Nativeint.of_int (get mb (b + p_blocks + (2 * k))), get mb (b + p_blocks + (2 * k) + 1)))
    |> List.sort compare
  in
  let run_batch batch ~with_parker =
    let killed = ref [] in
    for i = 0 to nworkers - 1 do start i done;
    (* mid-batch: one at random is killed and replaced *)
    for _ = 1 to kills_per_batch - nworkers do
      let i = Random.State.int rng nworkers in
      killed := kill_at_random batch i :: !killed;
      start i
    done;
    (* the batch ends with the last ones killed too *)
    for i = 0 to nworkers - 1 do killed := kill_at_random batch i :: !killed done;
    (* every worker of the batch is dead; the only other process using the
       pool is the parker, if any *)
    ignore (M.stats pool);
    let c = cached () in
    (if with_parker then begin
       let p = parker_blocks () in
       if not (all_cached c p && List.for_all (parkers p) c) then
         let others = List.filter (fun x -> not (parkers p x)) c in
         if others <> [] then
           note dead_cached "batch %d: %d blocks (%d bytes) cached besides the live parker's %d" batch
             (List.length others) (bytes others) (List.length p)
         else if not (c = [] && !ooms > 0) then
           note parker_cached "batch %d: %d of the parker's %d blocks still cached (no OOM took them back)"
             batch (List.length c) (List.length p)
     end
     else if c <> [] then
       note dead_cached "batch %d: %d blocks (%d bytes) of dead workers cached after stats" batch
         (List.length c) (bytes c));
    (* with the dead workers' blocks: their live ones, and their caches if
       they were not given back *)
    if not with_parker then greedy_dead := (batch, greedy ()) :: !greedy_dead;
    (* the killed workers' live blocks, as owners lists them, and what
       reclaim_dead frees *)
    let before = Shmpool.stats sp in
    let owners = Shmpool.owners sp in
    List.iter
      (fun (o : Shmpool.owner) ->
        if o.pages > 0 && (o.alive || not (List.mem o.pid !killed)) then
          note reclaim "batch %d: pid %d (%s) holds %d pages" batch o.pid
            (if o.alive then "alive" else "dead, not killed in this batch")
            o.pages)
      owners;
    let r = Shmpool.reclaim_dead sp in
    reclaimed := !reclaimed + r.pages_freed;
    let dead_pages =
      List.fold_left (fun a (o : Shmpool.owner) -> if o.alive then a else a + o.pages) 0 owners
    in
    if r.blocks_freed <> before.live_blocks then
      note reclaim "batch %d: reclaim_dead freed %d blocks of %d live" batch r.blocks_freed
        before.live_blocks;
    if r.pages_freed * ps <> payload - before.free || r.pages_freed <> dead_pages then
      note reclaim "batch %d: reclaim_dead freed %d pages; %d were not free, owners listed %d dead" batch
        r.pages_freed ((payload - before.free) / ps) dead_pages;
    List.iter
      (fun (pid, pages) ->
        if pages > 0 && not (List.mem pid !killed) then
          note reclaim "batch %d: reclaim_dead freed %d pages of pid %d, not killed" batch pages pid;
        match List.find_opt (fun (o : Shmpool.owner) -> o.pid = pid) owners with
        | Some o when o.pages <> pages ->
            note reclaim "batch %d: pid %d: owners said %d pages, reclaim_dead freed %d" batch pid o.pages
              pages
        | _ -> ())
      r.dead;
    if r.blocks_freed = 0 then note reclaim "batch %d: the killed workers held no blocks at all" batch;
    let s = Shmpool.stats sp in
    if s.free <> payload || s.live_blocks <> 0 || ((not with_parker) && s.largest_free <> payload) then
      note reclaim "batch %d: after reclaim_dead %d of %d pages free (largest run %d), %d live blocks" batch
        (s.free / ps) (payload / ps) (s.largest_free / ps) s.live_blocks;
    (match Shmpool.check sp with
     | [] -> ()
     | l -> note harness "batch %d: check: %s" batch (String.concat "; " l));
    (* with the live parker's cache alone, filled again (reclaim_dead may
       have taken it back: the old core did) *)
    if with_parker then begin
      parker_fill 2;
      ignore (M.stats pool);
      let c = cached () and p = parker_blocks () in
      if not (all_cached c p && List.for_all (parkers p) c) then
        note parker_cached "batch %d: refilled, %d of the parker's %d blocks cached, and %d others" batch
          (List.length (List.filter (fun b -> List.exists (parkers [ b ]) c) p))
          (List.length p)
          (List.length (List.filter (fun x -> not (parkers p x)) c));
      greedy_live := Some (greedy ())
    end
  in
  (try
     (* debug_info's offsets are from the mapping's start: make sure *)
     let m = M.alloc_mem pool ps in
     let off = Nativeint.to_int (Nativeint.sub (Netsys_mem.memory_address m) mapping) in
     if not (List.mem (off, ps) (listed "allocations" (M.debug_info pool))) then
       note harness "debug_info's offsets are not from the mapping's start";
     M.free_mem pool m;
     for batch = 1 to batches do
       let with_parker = batch = batches in
       if with_parker then begin
         let id = Netmcore_process.start ~inherit_resources:`All parker_fork pool in
         parker_id := Some id;
         parker_fill 1;
         ignore (M.stats pool);
         let c = cached () and p = parker_blocks () in
         if not (all_cached c p && List.for_all (parkers p) c) then
           note parker_cached "the parked worker's %d freed blocks are not what is cached: %d blocks"
             (List.length parker_pages) (List.length (cached ()))
       end;
       run_batch batch ~with_parker
     done;
     set mb (parker_base + p_release) 1;
     (match !parker_id with
      | Some id ->
          if Netmcore_process.join parker_join id <> Some true then note harness "the parked worker failed"
      | None -> ());
     parker_id := None
   with e ->
     note harness "first process: %s" (Printexc.to_string e);
     kill_all ());
  kill_all ();
  let s = Shmpool.stats sp in
  if s.free <> payload || s.largest_free <> payload || s.live_blocks <> 0 then
    note final "at the end: %d of %d pages free (largest run %d), %d live blocks" (s.free / ps) (payload / ps)
      (s.largest_free / ps) s.live_blocks;
  (match Shmpool.check sp with [] -> () | l -> note final "check: %s" (String.concat "; " l));
  let rev l = first8 (List.rev !l) in
  {
    kills = !kills;
    ops = !ops;
    reclaimed = !reclaimed;
    recoveries = s.recoveries;
    ooms = !ooms;
    dead_cached_batches = List.length !dead_cached;
    harness = rev harness;
    dead_cached = rev dead_cached;
    greedy_dead = List.rev !greedy_dead;
    greedy_live = !greedy_live;
    parker_cached = rev parker_cached;
    reclaim = rev reclaim;
    final = rev final;
  }

let first_fork, first_join = Netmcore_process.def_process first

let mib n = float n /. 1048576.

let run_suite () =
  let t0 = now () in
  mb := mailbox mailbox_words;
  let _pool, outcome, log =
    Torture_mcore.run_first ~name:"worker-kills" ~pool_bytes:(pool_pages * ps) first_fork first_join seed
  in
  let expected = batches * kills_per_batch in
  let short g = g.free - g.got in
  (match outcome with
   | None -> Printf.printf "torture %s: the first process returned nothing (seed %d)\n" suite seed
   | Some r ->
       let worst = List.fold_left (fun a (_, g) -> max a (short g)) 0 r.greedy_dead in
       report ~suite
         "%d kills in %d batches, %d ops (%d OOMs, %d recoveries, %d pages reclaimed); greedy short by \
          %.2f MiB at worst after the kills, %s with a live cache; dead workers' blocks cached after stats \
          in %d batches (%.1f s, seed %d)"
         r.kills batches r.ops r.ooms r.recoveries r.reclaimed (mib worst)
         (match r.greedy_live with Some g -> Printf.sprintf "%.2f MiB" (mib (short g)) | None -> "-")
         r.dead_cached_batches (now () -. t0) seed);
  let greedy_failed g = short g <> 0 || g.refused <> None in
  let failed =
    match outcome with
    | None -> true
    | Some r ->
        r.kills <> expected || r.harness <> [] || r.dead_cached <> [] || r.reclaim <> [] || r.final <> []
        || r.parker_cached <> []
        || List.exists (fun (_, g) -> greedy_failed g) r.greedy_dead
        || Option.fold ~none:true ~some:greedy_failed r.greedy_live
  in
  if failed then Torture_mcore.show_log log;
  let open Alcotest in
  let with_result f () =
    match outcome with None -> fail "the first process returned nothing" | Some r -> f r
  in
  let greedy_wrong what g =
    if not (greedy_failed g) then None
    else
      Some
        (Printf.sprintf "%s: %d bytes obtained of %d free (%.2f MiB short)%s" what g.got g.free
           (mib (short g))
           (match g.refused with
            | Some c -> Printf.sprintf ", alloc_mem %d (contiguous) refused" c
            | None -> ""))
  in
  run ~argv:[| Sys.argv.(0) |] "shmpool.netmcore worker kills"
    [
      ( "Netmcore",
        [
          test_case (Printf.sprintf "%d workers SIGKILLed at random moments" expected) `Quick
            (with_result (fun r ->
                 check (list string) "the run" [] r.harness;
                 check int "kills" expected r.kills));
          test_case "right after stats, no block of a dead worker is cached" `Quick
            (with_result (fun r ->
                 check (list string) "dead workers' blocks in debug_info's cache list" [] r.dead_cached));
          test_case "reclaim_dead frees the killed workers' live blocks" `Quick
            (with_result (fun r -> check (list string) "reclaim" [] r.reclaim));
          test_case "greedy contiguous obtains free, after the kills" `Quick
            (with_result (fun r ->
                 check int "batches checked" batches (List.length r.greedy_dead + 1);
                 check (list string) "allocating contiguous until it is 0 obtains free" []
                   (first8
                      (List.filter_map
                         (fun (b, g) -> greedy_wrong (Printf.sprintf "batch %d" b) g)
                         r.greedy_dead))));
          test_case "greedy contiguous obtains free, with a live worker's cache" `Quick
            (with_result (fun r ->
                 check (list string) "the parked worker's blocks in its cache" [] r.parker_cached;
                 match r.greedy_live with
                 | None -> fail "not run"
                 | Some g ->
                     check (option string) "allocating contiguous until it is 0 obtains free" None
                       (greedy_wrong "with the parked worker" g)));
          test_case "everything back at the end" `Quick
            (with_result (fun r -> check (list string) "final" [] r.final));
        ] );
    ]

(* Alcotest.run exits the runner with the verdict *)
let () = main ~suite (fun () -> run_suite (); true)
