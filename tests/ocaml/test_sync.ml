(* Shmpool_netmcore.Netmcore_mutex, _sem and _condition: the exact
   signatures; through real Netmcore workers: producer/consumer over a
   queue with a mutex and a condition (nothing lost or duplicated), a
   recursive mutex that excludes another process until its last unlock
   (the original's does not), error-checking, semaphore counts and
   EAGAIN, and a mutex whose owner is SIGKILLed while holding it: the next
   locker gets it (and sees the takeover in [recoveries]). *)

module _ : Struct_sigs.MUTEX = Shmpool_netmcore.Netmcore_mutex
module _ : Struct_sigs.SEM = Shmpool_netmcore.Netmcore_sem
module _ : Struct_sigs.CONDITION = Shmpool_netmcore.Netmcore_condition

module M = Shmpool_netmcore.Netmcore_mempool
module H = Shmpool_netmcore.Netmcore_heap
module Q = Shmpool_netmcore.Netmcore_queue
module Mx = Shmpool_netmcore.Netmcore_mutex
module Sem = Shmpool_netmcore.Netmcore_sem
module C = Shmpool_netmcore.Netmcore_condition

type hdr = {
  mutable m : Mx.mutex;
  mutable rm : Mx.mutex;
  mutable em : Mx.mutex;
  mutable c : C.condition;
  mutable s : Sem.semaphore;
  mutable done_ : int;
  mutable flag : int;
  mutable ws : C.wait_set;
}

let nprod = 2
let per = 500

let producer (pool, d, i) =
  let q = Q.squeue_of_descr pool d in
  let h = Q.header q in
  for k = 1 to per do
    Mx.lock h.m;
    Q.push (i, k) q;
    C.signal h.c;
    Mx.unlock h.m
  done;
  Mx.lock h.m;
  h.done_ <- h.done_ + 1;
  C.broadcast h.c;
  Mx.unlock h.m;
  0

let producer_fork, producer_join = Netmcore_process.def_process producer

let consumer (pool, d) =
  let q = Q.squeue_of_descr pool d in
  let h = Q.header q in
  let got = ref [] in
  let we = H.modify (Q.heap q) (fun m -> C.alloc_wait_entry m (C.create_wait_set m)) in
  Mx.lock h.m;
  let rec loop () =
    match Q.pop_c q with
    | x ->
        got := x :: !got;
        loop ()
    | exception Q.Empty ->
        if h.done_ < nprod then begin
          C.wait we h.c h.m;
          loop ()
        end
  in
  loop ();
  Mx.unlock h.m;
  !got

let consumer_fork, consumer_join = Netmcore_process.def_process consumer

(* Holds the recursive mutex twice, releases once, then tells the other
   process (flag 1) and waits for flag 2 before the last unlock. *)
let rec_holder (pool, d) =
  let q = Q.squeue_of_descr pool d in
  let h = Q.header q in
  Mx.lock h.rm;
  Mx.lock h.rm;
  Mx.unlock h.rm;
  h.flag <- 1;
  while h.flag <> 2 do Unix.sleepf 0.001 done;
  (* the other process could not get it while we held it *)
  let other_got_it = h.done_ = 99 in
  Mx.unlock h.rm;
  other_got_it

let rec_fork, rec_join = Netmcore_process.def_process rec_holder

(* Locks the mutex and dies holding it. *)
let dier (pool, d) =
  let h = Q.header (Q.squeue_of_descr pool d) in
  Mx.lock h.em;
  h.flag <- 3;
  Unix.kill (Unix.getpid ()) Sys.sigkill;
  ()

let dier_fork, dier_join = Netmcore_process.def_process dier

(* Waits with [wait_e] in its own event loop on its own named pipe;
   announces itself (flag 10) while holding the mutex, so once the other
   side sees flag 10 under the mutex, the entry is queued. *)
let e_waiter (pool, d, path, die) =
  let q = Q.squeue_of_descr pool d in
  let h = Q.header q in
  let we = H.modify (Q.heap q) (fun m -> C.alloc_wait_entry_e m (C.create_wait_set m) path) in
  let esys = Unixqueue.create_unix_event_system () in
  Mx.lock h.m;
  h.flag <- 10;
  let eng = C.wait_e we h.c h.m esys (fun () -> Uq_engines.epsilon_engine (`Done h.flag) esys) in
  if die then Unix.kill (Unix.getpid ()) Sys.sigkill;
  Unixqueue.run esys;
  let r = match eng#state with `Done f -> f | _ -> -1 in
  Mx.unlock h.m;
  r

let e_fork, e_join = Netmcore_process.def_process e_waiter

(* Waits with plain [wait] until flag 21 (announcing flag 20). *)
let f_waiter (pool, d) =
  let q = Q.squeue_of_descr pool d in
  let h = Q.header q in
  Mx.lock h.m;
  h.flag <- 20;
  let we = H.modify (Q.heap q) (fun m -> C.alloc_wait_entry m (C.create_wait_set m)) in
  while h.flag <> 21 do C.wait we h.c h.m done;
  Mx.unlock h.m;
  h.flag

let f_fork, f_join = Netmcore_process.def_process f_waiter

(* Locks the mutex until [flag] is [seen], then sets [next], signals once
   and unlocks. *)
let signal_when h seen next =
  let rec go () =
    Mx.lock h.m;
    if h.flag = seen then begin
      h.flag <- next;
      C.signal h.c;
      Mx.unlock h.m
    end
    else begin
      Mx.unlock h.m;
      Unix.sleepf 0.001;
      go ()
    end
  in
  go ()

let first (pool, d) =
  let q = Q.squeue_of_descr pool d in
  let h = Q.header q in
  (* producer / consumer *)
  let c = Netmcore_process.start ~inherit_resources:`All consumer_fork (pool, d) in
  let ps = List.init nprod (fun i -> Netmcore_process.start ~inherit_resources:`All producer_fork (pool, d, i)) in
  List.iter (fun p -> ignore (Netmcore_process.join producer_join p)) ps;
  let got = match Netmcore_process.join consumer_join c with Some l -> l | None -> [] in
  let sorted = List.sort compare got in
  let expected = List.sort compare (List.concat (List.init nprod (fun i -> List.init per (fun k -> (i, k + 1))))) in
  let pc = sorted = expected in
  (* recursive mutex *)
  h.flag <- 0;
  h.done_ <- 0;
  let r = Netmcore_process.start ~inherit_resources:`All rec_fork (pool, d) in
  while h.flag <> 1 do Unix.sleepf 0.001 done;
  (* a thread tries to take it; it must not succeed while the holder holds *)
  let t = Thread.create (fun () -> Mx.lock h.rm; h.done_ <- 99; Mx.unlock h.rm) () in
  Unix.sleepf 0.05;
  let got_early = h.done_ = 99 in
  h.flag <- 2;
  let holder_saw = Netmcore_process.join rec_join r in
  Thread.join t;
  let rec_ok = (not got_early) && holder_saw = Some false && h.done_ = 99 in
  (* dead owner *)
  h.flag <- 0;
  let before = Mx.recoveries h.em in
  ignore (Netmcore_process.join dier_join (Netmcore_process.start ~inherit_resources:`All dier_fork (pool, d)));
  let died_holding = h.flag = 3 in
  Mx.lock h.em;
  let taken = Mx.recoveries h.em = before + 1 in
  Mx.unlock h.em;
  Mx.lock h.em;
  Mx.unlock h.em;
  (* wait_e across processes *)
  let dir = Filename.get_temp_dir_name () in
  let fifo i = Filename.concat dir (Printf.sprintf "shmpool-waite-%d-%d" (Unix.getpid ()) i) in
  let p1 = fifo 1 and p2 = fifo 2 in
  Unix.mkfifo p1 0o600;
  Unix.mkfifo p2 0o600;
  Fun.protect ~finally:(fun () -> List.iter (fun p -> try Unix.unlink p with _ -> ()) [ p1; p2 ]) (fun () ->
      h.flag <- 0;
      let w = Netmcore_process.start ~inherit_resources:`All e_fork (pool, d, p1, false) in
      signal_when h 10 11;
      let e_ok = Netmcore_process.join e_join w = Some 11 in
      (* an event waiter that dies while queued: the signal goes to the
         next waiter (here a plain one) instead of being lost *)
      h.flag <- 0;
      ignore (Netmcore_process.join e_join (Netmcore_process.start ~inherit_resources:`All e_fork (pool, d, p2, true)));
      let queued_dead = h.flag = 10 in
      let f = Netmcore_process.start ~inherit_resources:`All f_fork (pool, d) in
      signal_when h 20 21;
      let dead_skipped = Netmcore_process.join f_join f = Some 21 in
      (pc, List.length got, rec_ok, died_holding && taken, e_ok, queued_dead && dead_skipped))

let first_fork, first_join = Netmcore_process.def_process first

let () =
  let sockdir = Testutil_mcore.sockdir "shmpool-sync" in
  let master = Unix.getpid () in
  let pool = M.create_mempool (16 * 1024 * 1024) in
  (* Alcotest.run exits: unlink at exit (in the master only) *)
  at_exit (fun () -> if Unix.getpid () = master then try M.unlink_mempool pool with _ -> ());
  Fun.protect ~finally:(fun () -> try M.unlink_mempool pool with _ -> ()) (fun () ->
      let hdr0 = { m = Mx.dummy (); rm = Mx.dummy (); em = Mx.dummy (); c = C.dummy_condition (); s = Sem.dummy (); done_ = 0; flag = 0; ws = C.dummy_wait_set () } in
      let q : (int * int, hdr) Q.squeue = Q.create pool hdr0 in
      H.modify (Q.heap q) (fun m ->
          let h = Q.header q in
          h.m <- Mx.create m `Normal;
          h.rm <- Mx.create m `Recursive;
          h.em <- Mx.create m `Errorcheck;
          h.c <- C.create_condition m;
          h.s <- Sem.create m 2);
      let h = Q.header q in
      let open Alcotest in
      run "netmcore sync"
        [
          ( "local",
            [
              test_case "semaphore" `Quick (fun () ->
                  check int "value" 2 (Sem.getvalue h.s);
                  Sem.wait h.s Netsys_posix.SEM_WAIT_BLOCK;
                  Sem.wait h.s Netsys_posix.SEM_WAIT_NONBLOCK;
                  check_raises "EAGAIN" (Unix.Unix_error (Unix.EAGAIN, "sem_trywait", "")) (fun () ->
                      Sem.wait h.s Netsys_posix.SEM_WAIT_NONBLOCK);
                  Sem.post h.s;
                  check int "posted" 1 (Sem.getvalue h.s);
                  check_raises "dummy" (Failure "Netmcore_mutex.lock: dummy mutex") (fun () -> Mx.lock (Mx.dummy ())));
              test_case "wait_e in an event loop" `Quick (fun () ->
                  let path = Filename.concat (Filename.get_temp_dir_name ()) (Printf.sprintf "shmpool-we-%d" (Unix.getpid ())) in
                  Unix.mkfifo path 0o600;
                  Fun.protect ~finally:(fun () -> try Unix.unlink path with _ -> ()) (fun () ->
                      let we =
                        H.modify (Q.heap q) (fun m ->
                            h.ws <- C.create_wait_set m;
                            C.alloc_wait_entry_e m h.ws path)
                      in
                      let ws = h.ws in
                      (* the wait set keeps the entry alive *)
                      H.gc (Q.heap q);
                      check string "pipe_name" path (C.pipe_name we);
                      let esys = Unixqueue.create_unix_event_system () in
                      let run_once expect_flag =
                        Mx.lock h.em;
                        h.flag <- 0;
                        let eng =
                          C.wait_e we h.c h.em esys (fun () ->
                              (* the mutex is ours again: a second lock is refused *)
                              let relock = try Mx.lock h.em; false with Failure _ -> true in
                              Uq_engines.epsilon_engine (`Done (h.flag, relock)) esys)
                        in
                        (* wait_e released the mutex: another party can lock it *)
                        let g = Unixqueue.new_group esys in
                        Unixqueue.once esys g 0.0 (fun () ->
                            Mx.lock h.em;
                            h.flag <- expect_flag;
                            C.signal h.c;
                            Mx.unlock h.em);
                        Unixqueue.run esys;
                        (match eng#state with
                        | `Done (f, relock) ->
                            check int "cont saw the signaller's change" expect_flag f;
                            check bool "mutex held in cont" true relock
                        | _ -> fail "wait_e engine not done");
                        Mx.unlock h.em
                      in
                      run_once 1;
                      (* the entry is reusable, and a stale byte in the pipe is not a signal *)
                      run_once 2;
                      (* aborted before any signal: dequeued, so the next signal
                         goes to nobody and a broadcast reaches the next wait *)
                      Mx.lock h.em;
                      let eng = C.wait_e we h.c h.em esys (fun () -> Uq_engines.epsilon_engine (`Done ()) esys) in
                      eng#abort ();
                      check bool "aborted" true (match eng#state with `Aborted -> true | _ -> false);
                      Mx.lock h.em;
                      Mx.unlock h.em;
                      check_raises "mutex not held" (Failure "Netmcore_mutex.unlock: not locked by this process") (fun () ->
                          ignore (C.wait_e we h.c h.em esys (fun () -> Uq_engines.epsilon_engine (`Done ()) esys)));
                      H.modify (Q.heap q) (fun m -> C.free_wait_entry_e m ws we);
                      check bool "pipe deleted" false (Sys.file_exists path)));
              test_case "errorcheck" `Quick (fun () ->
                  Mx.lock h.em;
                  check_raises "relock" (Failure "Netmcore_mutex.lock: already locked by this process") (fun () -> Mx.lock h.em);
                  Mx.unlock h.em;
                  check_raises "unlock unlocked" (Failure "Netmcore_mutex.unlock: not locked by this process") (fun () -> Mx.unlock h.em));
            ] );
          ( "workers",
            [
              test_case "producer/consumer, recursive exclusion, dead owner" `Quick (fun () ->
                  match Testutil_mcore.netmcore_run sockdir first_fork first_join (pool, Q.descr_of_squeue q) with
                  | None -> fail "no result"
                  | Some (pc, n, rec_ok, dead, e_ok, dead_e) ->
                      check bool "wait_e in another process wakes on signal, with the mutex" true e_ok;
                      check bool "a dead event waiter does not swallow the signal" true dead_e;
                      check int "consumed" (nprod * per) n;
                      check bool "nothing lost or duplicated" true pc;
                      check bool "recursive mutex excludes until the last unlock" true rec_ok;
                      check bool "dead owner's mutex taken over, recoveries counted" true dead);
            ] );
        ])
