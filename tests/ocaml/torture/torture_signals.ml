(* Signal storm: two processes share a pool and loop over alloc, free,
   size, stats, check, debug_info, owners, flush_cache, reclaim_dead and
   pool creation with prefault (posix_fallocate) while SIGALRM arrives at
   ~2.5 kHz (Unix.setitimer, an OCaml handler that itself allocates and
   frees now and then) and SIGCHLD constantly (each process forks children
   that exit at once, some after an alloc and a free). No exception may
   escape (EINTR above all), no lock may be lost (no deadlock, no
   recovery: nobody died), and the pool must be sound and entirely free at
   the end. *)

open Torture

let suite = "signals"
let nprocs = 2
let pool_pages = 1024
let seconds = 0.5 *. float scale
let interval = 0.0004

(* per process, in the mailbox *)
let s_ops = 0
let s_alarms = 1
let s_chlds = 2
let s_children = 3
let s_exceptions = 4
let s_eintr = 5
let s_violations = 6
let s_prefaults = 7
let s_in_handler = 8
let s_done = 9
let s_killed = 10
let words = 16

let storm pool mb i seed =
  let base = i * words in
  let rng = Random.State.make [| seed |] in
  let held = ref [] and nheld = ref 0 in
  let first_error = ref true in
  let error e =
    (match e with
     | Unix.Unix_error (Unix.EINTR, _, _) -> bump mb (base + s_eintr)
     | Failure m when (try ignore (Str.search_forward (Str.regexp_string "nterrupted") m 0); true with Not_found -> false) ->
         bump mb (base + s_eintr)
     | _ -> ());
    bump mb (base + s_exceptions);
    if !first_error then begin
      first_error := false;
      prerr_endline (Printf.sprintf "torture %s: process %d: %s" suite i (Printexc.to_string e))
    end
  in
  let violation what =
    bump mb (base + s_violations);
    prerr_endline (Printf.sprintf "torture %s: process %d: %s" suite i what)
  in
  (* the handler itself uses the pool now and then: the API is reentrant at
     OCaml's safe points *)
  Sys.set_signal Sys.sigalrm
    (Sys.Signal_handle
       (fun _ ->
         bump mb (base + s_alarms);
         if get mb (base + s_alarms) land 7 = 0 then
           match Shmpool.alloc pool ps with
           | m -> Shmpool.free pool m; bump mb (base + s_in_handler)
           | exception Shmpool.Out_of_pool_memory -> ()
           | exception e -> error e));
  Sys.set_signal Sys.sigchld (Sys.Signal_handle (fun _ -> bump mb (base + s_chlds)));
  let kids = ref [] in
  let reap_kids () =
    kids :=
      List.filter
        (fun pid ->
          match retry (Unix.waitpid [ Unix.WNOHANG ]) pid with
          | 0, _ -> true
          | _ -> false
          | exception Unix.Unix_error (Unix.ECHILD, _, _) -> false)
        !kids
  in
  let spawn_kid () =
    let use_pool = Random.State.bool rng in
    match Unix.fork () with
    | 0 ->
        (if use_pool then
           try
             let m = Shmpool.alloc pool ps in
             Shmpool.free pool m;
             Shmpool.flush_cache pool
           with _ -> ());
        Unix._exit 0
    | pid ->
        kids := pid :: !kids;
        bump mb (base + s_children)
  in
  let op k =
    let r = Random.State.int rng 100 in
    if r < 35 && !nheld < 16 then begin
      let pages = random_pages rng in
      match Shmpool.alloc pool (pages * ps) with
      | m ->
          let t = Int64.of_int ((i lsl 40) lor k) in
          stamp m t;
          held := (m, t) :: !held;
          incr nheld
      | exception Shmpool.Out_of_pool_memory -> ()
    end
    else if r < 70 then begin
      match !held with
      | (m, t) :: rest ->
          if not (intact m t) then violation "a live block's stamp was overwritten";
          if Shmpool.size pool m <> Bigarray.Array1.dim m then violation "size";
          if Shmpool.size_at_addr pool (Shmpool.addr_of m) <> Bigarray.Array1.dim m then violation "size_at_addr";
          Shmpool.free pool m;
          held := rest;
          decr nheld
      | [] -> ()
    end
    else if r < 85 then ignore (Shmpool.stats pool)
    else if r < 90 then Shmpool.flush_cache pool
    else if r < 93 then spawn_kid ()
    else if r < 95 then (match Shmpool.check pool with [] -> () | l -> violation (String.concat "; " l))
    else if r < 97 then ignore (String.length (Shmpool.debug_info pool) + List.length (Shmpool.owners pool))
    else if r < 99 || Random.State.int rng 4 > 0 then ignore (Shmpool.reclaim_dead pool)
    else if Random.State.bool rng then begin
      (* posix_fallocate of a fresh pool, under the storm *)
      let p = Shmpool.create ~prefault:true ((1 + Random.State.int rng 16) * 1024 * 1024) in
      bump mb (base + s_prefaults);
      Fun.protect ~finally:(fun () -> Shmpool.close p) (fun () ->
          let m = Shmpool.alloc p ps in
          Shmpool.free p m)
    end
    else begin
      let name = shm_name "sig" in
      let p = Shmpool.create ~name ~prefault:true (1024 * 1024) in
      bump mb (base + s_prefaults);
      Fun.protect
        ~finally:(fun () -> (try Shmpool.unlink p with _ -> ()); Shmpool.close p)
        (fun () ->
          let q = Shmpool.attach name in
          let m = Shmpool.alloc q ps in
          Shmpool.free p (Bigarray.Array1.sub (Shmpool.alloc p ps) 0 1);
          Shmpool.free q m;
          Shmpool.close q)
    end;
    if k land 63 = 0 then reap_kids ();
    bump mb (base + s_ops)
  in
  ignore (Unix.setitimer Unix.ITIMER_REAL { Unix.it_interval = interval; it_value = interval });
  let t0 = now () in
  let k = ref 0 in
  while now () -. t0 < seconds do
    incr k;
    try op !k with e -> error e
  done;
  ignore (Unix.setitimer Unix.ITIMER_REAL { Unix.it_interval = 0.; it_value = 0. });
  (try List.iter (fun (m, _) -> Shmpool.free pool m) !held; Shmpool.flush_cache pool with e -> error e);
  (* The children exit by themselves once their alloc, free and flush are
     done: wait for them. Killing one still at work (a loaded machine is
     slow to run them) killed it holding the pool lock, and the next
     acquisition then counted a recovery this suite forbids. *)
  let deadline = now () +. 30. in
  while !kids <> [] && now () < deadline do
    reap_kids ();
    if !kids <> [] then (try Unix.sleepf 0.001 with Unix.Unix_error (Unix.EINTR, _, _) -> ())
  done;
  List.iter (fun pid -> kill pid Sys.sigkill; reap pid; bump mb (base + s_killed)) !kids;
  set mb (base + s_done) 1;
  0

let run () =
  let t0 = now () in
  let pool = Shmpool.create (pool_pages * ps) in
  let mb = mailbox (nprocs * words) in
  let rng = Random.State.make [| seed |] in
  let pids = List.init nprocs (fun i -> let s = Random.State.bits rng in spawn (fun () -> storm pool mb i s)) in
  let deadlocks = ref 0 and violations = ref 0 in
  List.iter
    (fun pid ->
      match wait_for ~secs:(seconds +. 60.) pid with
      | Exited 0 -> ()
      | Timeout -> incr deadlocks; kill_and_reap pid
      | Exited c -> incr violations; prerr_endline (Printf.sprintf "torture %s: a process exited %d" suite c)
      | Signaled s -> incr violations; prerr_endline (Printf.sprintf "torture %s: a process killed by signal %d" suite s))
    pids;
  let sum w = List.fold_left ( + ) 0 (List.init nprocs (fun i -> get mb ((i * words) + w))) in
  violations := !violations + sum s_violations;
  (match Shmpool.check pool with
   | [] -> ()
   | l -> incr violations; prerr_endline ("torture signals: check: " ^ String.concat "; " l));
  ignore (Shmpool.reclaim_dead pool);
  let s = Shmpool.stats pool in
  let lost = (s.payload - s.free) / ps in
  if lost <> 0 || s.live_blocks <> 0 || s.largest_free <> s.payload then begin
    incr violations;
    prerr_endline (Printf.sprintf "torture signals: %d pages not free at the end\n%s" lost (Shmpool.debug_info pool))
  end;
  let exceptions = sum s_exceptions in
  report ~suite
    "%d processes, %.1f s each, %d ops, %d SIGALRM (%d pool ops in the handler), %d SIGCHLD, %d children (%d still at work after 30 s, killed), %d prefaulted pools, %d exceptions (%d EINTR), %d deadlocks, %d recoveries, %d violations, %d pages lost (%.1f s, seed %d)"
    nprocs seconds (sum s_ops) (sum s_alarms) (sum s_in_handler) (sum s_chlds) (sum s_children) (sum s_killed)
    (sum s_prefaults) exceptions (sum s_eintr) !deadlocks s.recoveries !violations lost (now () -. t0) seed;
  Shmpool.close pool;
  (* A recovery only for a child that had to be killed at work. *)
  exceptions = 0 && !deadlocks = 0 && s.recoveries <= sum s_killed && !violations = 0 && lost = 0
  && sum s_done = nprocs

let () = main ~suite run
