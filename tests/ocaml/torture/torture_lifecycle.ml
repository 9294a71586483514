(* Lifecycle: the process that made the pool dies (SIGKILL) while its
   workers go on.
   - fork: a parent creates a named Shmpool pool, forks workers that attach
     it by name, and churns itself until this suite (its supervisor) kills
     it at a random moment;
   - netmcore: a Netmcore master creates a pool with create_mempool and runs
     workers (Netmcore_process.start ~inherit_resources:`All) until this
     suite kills the master.
   The orphaned workers must finish their alloc/free loops (under a
   deadline); then the pool, attached by name, must be sound and entirely
   free after reclaim_dead, and is unlinked. Whatever the outcome, no
   process and no shm object is left. *)

open Torture
module M = Shmpool_netmcore.Netmcore_mempool

let suite = "lifecycle"
let nworkers = 3
let pool_pages = 1024
let worker_ops = 20000
let trials = 10 * scale
let deadline = 20.0

(* mailbox: worker slots 0..nworkers-1, the parent's at nworkers; then
   the pid of Netmcore's first process *)
let first_pid_word = (nworkers + 1) * slot_words
let mb = mailbox (first_pid_word + 1)

type tally = {
  mutable parents_killed : int;
  mutable outlived : int;  (** workers still working when their parent died *)
  mutable finished : int;
  mutable lingered : int;  (** processes that had to be killed after their work *)
  mutable deadlocks : int;
  mutable violations : int;
  mutable lost : int;
  mutable reclaimed : int;
  mutable recoveries : int;
}

let tally =
  { parents_killed = 0; outlived = 0; finished = 0; lingered = 0; deadlocks = 0; violations = 0; lost = 0; reclaimed = 0; recoveries = 0 }

let violation fmt =
  Printf.ksprintf
    (fun s ->
      if tally.violations < 5 then prerr_endline ("torture " ^ suite ^ ": " ^ s);
      tally.violations <- tally.violations + 1)
    fmt

let worker_base i = i * slot_words

(* The pool lock's words as raw bytes of the shm object (glibc's
   pthread_mutex_t at offset 64 of the header: lock word, count, owner
   tid, users, kind), to tell who holds it when a worker hangs. *)
let lock_words name =
  match Unix.openfile ("/dev/shm" ^ name) [ Unix.O_RDONLY ] 0 with
  | exception Unix.Unix_error _ -> "?"
  | fd ->
      let b = Bytes.create 128 in
      let n = try Unix.read fd b 0 128 with Unix.Unix_error _ -> 0 in
      Unix.close fd;
      if n < 84 then "?"
      else
        let w i = Int32.to_int (Bytes.get_int32_le b (64 + (4 * i))) land 0xffffffff in
        Printf.sprintf "lock 0x%x (tid %d%s%s), owner %d, users %d, kind %d" (w 0) (w 0 land 0x3fffffff)
          (if w 0 land 0x80000000 <> 0 then ", waiters" else "")
          (if w 0 land 0x40000000 <> 0 then ", owner died" else "")
          (w 2) (w 3) (w 4)

(* Wait until the workers have started, kill [parent] at a random moment,
   wait for the workers to say they finished, kill whatever is left. *)
let kill_parent_and_wait ?(name = "") rng ~what ~parent ~extra_pids =
  let t0 = now () in
  let started () = List.for_all (fun i -> get mb (worker_base i + w_progress) > 0) (List.init nworkers Fun.id) in
  while (not (started ())) && now () -. t0 < deadline do sleep 0.0002 done;
  if not (started ()) then violation "%s: the workers never started" what;
  sleep (Random.State.float rng 0.001);
  kill parent Sys.sigkill;
  (match wait_for ~secs:deadline parent with
   | Signaled s when s = Sys.sigkill -> tally.parents_killed <- tally.parents_killed + 1
   | Timeout -> kill_and_reap parent; tally.deadlocks <- tally.deadlocks + 1
   | Exited c -> violation "%s: the parent exited %d before it was killed" what c
   | Signaled s -> violation "%s: the parent died of signal %d" what s);
  let status i = get mb (worker_base i + w_status) in
  List.iter (fun i -> if status i = 0 then tally.outlived <- tally.outlived + 1) (List.init nworkers Fun.id);
  let t1 = now () in
  while List.exists (fun i -> status i <> 1) (List.init nworkers Fun.id) && now () -. t1 < deadline do
    sleep 0.0005
  done;
  List.iter
    (fun i ->
      let b = worker_base i in
      if status i = 1 then tally.finished <- tally.finished + 1
      else begin
        tally.deadlocks <- tally.deadlocks + 1;
        prerr_endline
          (Printf.sprintf "torture %s: %s: worker %d hung (killed); parent %d, workers [%s], %s" suite what i parent
             (String.concat ";" (List.init nworkers (fun j -> string_of_int (get mb (worker_base j + w_pid)))))
             (lock_words name));
        diagnose (get mb (b + w_pid))
      end;
      tally.violations <- tally.violations + get mb (b + w_violations))
    (List.init nworkers Fun.id);
  (* the workers are orphans now (reaped by the supervisor): give them a
     moment to exit, then kill what lingers *)
  List.iter
    (fun pid ->
      if pid > 0 && not (wait_gone ~secs:(if what = "fork" then 5.0 else 0.5) pid) then begin
        tally.lingered <- tally.lingered + 1;
        kill pid Sys.sigkill;
        ignore (wait_gone pid)
      end)
    (List.init nworkers (fun i -> get mb (worker_base i + w_pid)) @ extra_pids ())

(* The pool, attached by name: sound, and all free once the dead are
   reclaimed; then unlinked. *)
let verify_and_unlink what name ~dead_parent =
  match Shmpool.attach name with
  | exception e -> violation "%s: attach %s: %s" what name (Printexc.to_string e)
  | q ->
      (match Shmpool.check q with [] -> () | l -> violation "%s: check: %s" what (String.concat "; " l));
      let r = Shmpool.reclaim_dead q in
      tally.reclaimed <- tally.reclaimed + r.pages_freed;
      List.iter
        (fun (pid, pages) ->
          if pages > 0 && pid <> dead_parent then violation "%s: worker %d died holding %d pages" what pid pages)
        r.dead;
      let s = Shmpool.stats q in
      tally.recoveries <- tally.recoveries + s.recoveries;
      if s.free <> s.payload || s.live_blocks <> 0 || s.largest_free <> s.payload then begin
        tally.lost <- tally.lost + max 1 ((s.payload - s.free) / ps);
        violation "%s: %d pages not free at the end" what ((s.payload - s.free) / ps)
      end;
      (match Shmpool.check q with [] -> () | l -> violation "%s: check at the end: %s" what (String.concat "; " l));
      Shmpool.unlink q;
      Shmpool.close q;
      if Sys.file_exists ("/dev/shm" ^ name) then violation "%s: %s still in /dev/shm" what name

(* ----- a plain parent ------------------------------------------------------------ *)

let fork_trial rng trial =
  Bigarray.Array1.fill mb 0L;
  let name = shm_name "life" in
  let seeds = Array.init (nworkers + 1) (fun _ -> Random.State.bits rng) in
  let parent =
    spawn (fun () ->
        let pool = Shmpool.create ~name (pool_pages * ps) in
        for i = 0 to nworkers - 1 do
          ignore
            (spawn (fun () ->
                 let q = Shmpool.attach name in
                 churn (shmpool_api q) mb (worker_base i) ~rng:(Random.State.make [| seeds.(i) |]) ~ops:worker_ops
                   ~tag:(Int64.of_int ((trial lsl 4) lor i));
                 Shmpool.close q;
                 0))
        done;
        (* the parent churns too, holding blocks when it dies *)
        churn (shmpool_api pool) mb (worker_base nworkers) ~rng:(Random.State.make [| seeds.(nworkers) |]) ~ops:max_int
          ~tag:(Int64.of_int ((trial lsl 4) lor nworkers));
        0)
  in
  kill_parent_and_wait ~name rng ~what:"fork" ~parent ~extra_pids:(fun () -> []);
  verify_and_unlink "fork" name ~dead_parent:parent

(* ----- a Netmcore master ---------------------------------------------------------- *)

let nm_api = Torture_mcore.netmcore_api

let nm_worker (id, i, tag, s) =
  churn (nm_api id) mb (worker_base i) ~rng:(Random.State.make [| s |]) ~ops:worker_ops ~tag;
  true

let nm_worker_fork, nm_worker_join = Netmcore_process.def_process nm_worker

let nm_first (id, trial, seeds) =
  set mb first_pid_word (Unix.getpid ());
  let ws =
    List.init nworkers (fun i ->
        Netmcore_process.start ~inherit_resources:`All nm_worker_fork
          (id, i, Int64.of_int ((trial lsl 4) lor i), seeds.(i)))
  in
  List.iter (fun w -> ignore (Netmcore_process.join nm_worker_join w)) ws

let nm_first_fork, _nm_first_join = Netmcore_process.def_process nm_first

let netmcore_trial rng trial =
  Bigarray.Array1.fill mb 0L;
  let seeds = Array.init nworkers (fun _ -> Random.State.bits rng) in
  let sockdir = temp_dir "life-netmcore" in
  let rd, wr = Unix.pipe ~cloexec:true () in
  let master =
    spawn (fun () ->
        Unix.close rd;
        let id = M.create_mempool (pool_pages * ps) in
        let name = M.shm_name id in
        record_shm name;
        let line = name ^ "\n" in
        ignore (Unix.write_substring wr line 0 (String.length line));
        Unix.close wr;
        (* Netplex reports the workers' deaths on stderr *)
        let null = Unix.openfile "/dev/null" [ Unix.O_WRONLY ] 0 in
        Unix.dup2 null Unix.stderr;
        Netmcore.startup ~socket_directory:sockdir
          ~first_process:(fun () -> Netmcore_process.start ~inherit_resources:`All nm_first_fork (id, trial, seeds))
          ();
        0)
  in
  Unix.close wr;
  let name =
    let ic = Unix.in_channel_of_descr rd in
    let n = try Some (retry input_line ic) with End_of_file -> None in
    close_in ic;
    n
  in
  match name with
  | None -> violation "netmcore: the master made no pool"; kill_and_reap master; rm_rf sockdir
  | Some name ->
      kill_parent_and_wait ~name rng ~what:"netmcore" ~parent:master ~extra_pids:(fun () -> [ get mb first_pid_word ]);
      verify_and_unlink "netmcore" name ~dead_parent:master;
      rm_rf sockdir

let run () =
  let t0 = now () in
  let rng = Random.State.make [| seed |] in
  for trial = 1 to trials do
    fork_trial rng trial;
    netmcore_trial rng trial
  done;
  let t = tally in
  report ~suite
    "%d trials (%d fork, %d netmcore), %d parents killed, %d workers outlived them, %d finished, %d deadlocks, %d violations, %d pages lost (%d lingering Netmcore processes killed, %d recoveries, %d pages reclaimed, %.1f s, seed %d)"
    (2 * trials) trials trials t.parents_killed t.outlived t.finished t.deadlocks t.violations t.lost t.lingered
    t.recoveries t.reclaimed (now () -. t0) seed;
  t.parents_killed = 2 * trials && t.finished = 2 * trials * nworkers && t.deadlocks = 0 && t.violations = 0 && t.lost = 0

let () = main ~suite run
