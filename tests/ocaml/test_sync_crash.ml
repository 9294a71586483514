(* Netmcore_condition, Netmcore_mutex and Netmcore_buffer against the
   faults an independent review found (issue 12), each staged exactly:
   - a signaller SIGKILLed between the steps of [signal] (test-only crash
     points in the stubs) must not leave an event waiter waiting forever;
   - a process that died holding a condition's list lock and is not reaped
     yet (a zombie) must not block [signal] of other processes;
   - a [`Normal] mutex is a binary semaphore: another process or thread
     may unlock it, and a dead holder's lock goes to the next locker;
   - [Netmcore_buffer.add_*] and [delete_hd] allocate a small constant
     number of heap words, not a copy of the whole buffer.
   Plain forked children (no Netmcore master); a child that would hang is
   killed by a watchdog (a generous deadline that only turns a hang into a
   failure), and every child, pipe and pool is removed even on failure. *)

open Shmpool_netmcore
module C = Netmcore_condition
module Mx = Netmcore_mutex
module H = Netmcore_heap
module B = Netmcore_buffer

type hdr = {
  mutable m : Mx.mutex;
  mutable c : C.condition;
  mutable ws : C.wait_set;
  mutable queued : int;
  mutable tickets : int;  (* wake-ups handed out, not yet taken *)
  mutable woken : int;  (* live waiters that took a ticket *)
}

let master = Unix.getpid ()
let kids = ref []

let reap_all () =
  List.iter
    (fun p ->
      (try Unix.kill p Sys.sigkill with Unix.Unix_error _ -> ());
      try ignore (Unix.waitpid [] p) with Unix.Unix_error _ -> ())
    !kids;
  kids := []

let () = at_exit (fun () -> if Unix.getpid () = master then reap_all ())
let forget pid = kids := List.filter (( <> ) pid) !kids

(* Runs [f] in a child, which exits 0 if [f] returns true, 1 otherwise
   (2 on an exception). *)
let fork_child f =
  match Unix.fork () with
  | 0 ->
      let code = match f () with true -> 0 | false -> 1 | exception e -> prerr_endline (Printexc.to_string e); 2 in
      Unix._exit code
  | p ->
      kids := p :: !kids;
      p

(* The child's status, or [None] if it did not end before the watchdog's
   deadline (a hang: it is killed and reaped then). *)
let watchdog_s = try float_of_string (Sys.getenv "SHMPOOL_WATCHDOG_S") with Not_found | Failure _ -> 60.0

let await pid =
  let deadline = Unix.gettimeofday () +. watchdog_s in
  let rec go () =
    match Unix.waitpid [ Unix.WNOHANG ] pid with
    | 0, _ ->
        if Unix.gettimeofday () > deadline then begin
          Unix.kill pid Sys.sigkill;
          ignore (Unix.waitpid [] pid);
          forget pid;
          None
        end
        else begin
          Unix.sleepf 0.01;
          go ()
        end
    | _, st ->
        forget pid;
        Some st
  in
  go ()

let status_str = function
  | None -> "hung (killed by the watchdog)"
  | Some (Unix.WEXITED n) -> Printf.sprintf "exit %d" n
  | Some (Unix.WSIGNALED n) -> Printf.sprintf "signal %d" n
  | Some (Unix.WSTOPPED n) -> Printf.sprintf "stopped %d" n

let check_status what expected st = Alcotest.(check string) what (status_str (Some expected)) (status_str st)

(* Forks a child running [f], which is expected to die; returns once it has
   died but without reaping it: it stays a zombie until [await]. Its death
   is seen through a pipe whose only writer it is (the kernel closes its
   descriptors, and releases its robust mutexes, before it becomes a
   zombie). *)
let dead_unreaped f =
  let r, w = Unix.pipe ~cloexec:true () in
  let p =
    fork_child (fun () ->
        Unix.close r;
        f ())
  in
  Unix.close w;
  let b = Bytes.create 1 in
  let rec eof () = match Unix.read r b 0 1 with 0 -> () | _ -> eof () | exception Unix.Unix_error (Unix.EINTR, _, _) -> eof () in
  eof ();
  Unix.close r;
  p

let with_pool f =
  let pool = Netmcore_mempool.create_mempool (16 * 1024 * 1024) in
  Fun.protect
    ~finally:(fun () ->
      reap_all ();
      try Netmcore_mempool.unlink_mempool pool with _ -> ())
    (fun () -> f pool)

let with_header pool kind f =
  let r = Netmcore_ref.sref pool { m = Mx.dummy (); c = C.dummy_condition (); ws = C.dummy_wait_set (); queued = 0; tickets = 0; woken = 0 } in
  H.modify (Netmcore_ref.heap r) (fun mu ->
      let h = Netmcore_ref.deref_ro r in
      h.m <- Mx.create mu kind;
      h.c <- C.create_condition mu;
      h.ws <- C.create_wait_set mu);
  f r (Netmcore_ref.deref_ro r)

let with_fifo f =
  let path =
    Filename.concat (Filename.get_temp_dir_name ())
      (Printf.sprintf "shmpool-synccrash-%d-%d" (Unix.getpid ()) (Random.bits ()))
  in
  Unix.mkfifo path 0o600;
  Fun.protect ~finally:(fun () -> try Unix.unlink path with Unix.Unix_error _ -> ()) (fun () -> f path)

(* A child waiting with [wait_e] in its own event loop; returns once its
   entry is queued (it sets [queued] under the mutex before [wait_e]
   releases it). *)
let start_event_waiter r h path =
  let p =
    fork_child (fun () ->
        let we = H.modify (Netmcore_ref.heap r) (fun mu -> C.alloc_wait_entry_e mu h.ws path) in
        let esys = Unixqueue.create_unix_event_system () in
        Mx.lock h.m;
        h.queued <- 1;
        let eng = C.wait_e we h.c h.m esys (fun () -> Uq_engines.epsilon_engine (`Done ()) esys) in
        Unixqueue.run esys;
        Mx.unlock h.m;
        match eng#state with `Done () -> true | _ -> false)
  in
  let rec until_queued () =
    Mx.lock h.m;
    let q = h.queued in
    Mx.unlock h.m;
    if q = 0 then begin
      Unix.sleepf 0.001;
      until_queued ()
    end
  in
  until_queued ();
  p

(* A signaller SIGKILLed at [point] inside [signal]; then the program goes
   on with one more signal: the event waiter must wake. *)
let signaller_dies point () =
  with_pool (fun pool ->
      with_header pool `Normal (fun r h ->
          with_fifo (fun path ->
              let w = start_event_waiter r h path in
              let s =
                fork_child (fun () ->
                    Struct_internal.sync_crash_at point;
                    C.signal h.c;
                    false)
              in
              check_status "the signaller died at the crash point" (Unix.WSIGNALED Sys.sigkill) (await s);
              Mx.lock h.m;
              C.signal h.c;
              Mx.unlock h.m;
              check_status "the event waiter woke" (Unix.WEXITED 0) (await w))))

(* The list lock's holder died and is a zombie (not reaped): [signal] and
   [broadcast] by another process return. *)
let zombie_list_holder () =
  with_pool (fun pool ->
      with_header pool `Normal (fun _ h ->
          let z =
            dead_unreaped (fun () ->
                Struct_internal.sync_crash_at "cond:list-locked";
                C.signal h.c;
                false)
          in
          let s =
            fork_child (fun () ->
                C.signal h.c;
                C.broadcast h.c;
                true)
          in
          let st = await s in
          check_status "the list lock holder was killed there" (Unix.WSIGNALED Sys.sigkill) (await z);
          check_status "signal and broadcast returned" (Unix.WEXITED 0) st))

(* A child that locks [m] and unlocks it again: exit 0 unless the lock
   stays held forever (the watchdog then kills it). *)
let lock_unlock_child m =
  fork_child (fun () ->
      Mx.lock m;
      Mx.unlock m;
      true)

(* A [`Normal] mutex has no owner: a process or thread that did not lock
   it may unlock it (a hand-off), as with OCamlnet's. *)
let normal_hand_off () =
  with_pool (fun pool ->
      with_header pool `Normal (fun _ h ->
          Mx.lock h.m;
          let u = fork_child (fun () -> Mx.unlock h.m; true) in
          check_status "another process unlocked it" (Unix.WEXITED 0) (await u);
          check_status "then it is free" (Unix.WEXITED 0) (await (lock_unlock_child h.m));
          Mx.lock h.m;
          let r = ref "not run" in
          let t = Thread.create (fun () -> r := match Mx.unlock h.m with () -> "ok" | exception e -> Printexc.to_string e) () in
          Thread.join t;
          Alcotest.(check string) "another thread unlocked it" "ok" !r;
          check_status "then it is free" (Unix.WEXITED 0) (await (lock_unlock_child h.m));
          Alcotest.check_raises "unlock of a free mutex" (Failure "Netmcore_mutex.unlock: not locked") (fun () -> Mx.unlock h.m);
          Alcotest.(check int) "no recoveries" 0 (Mx.recoveries h.m)))

(* A [`Normal] mutex's holder dies (and stays an unreaped zombie): the next
   locker gets it, whether it comes after the death or sleeps on the mutex
   when the holder dies; each takeover is counted. *)
let normal_dead_holder () =
  with_pool (fun pool ->
      with_header pool `Normal (fun _ h ->
          let z1 =
            dead_unreaped (fun () ->
                Mx.lock h.m;
                Unix.kill (Unix.getpid ()) Sys.sigkill;
                false)
          in
          check_status "a locker after the holder's death gets it" (Unix.WEXITED 0) (await (lock_unlock_child h.m));
          Alcotest.(check int) "one takeover" 1 (Mx.recoveries h.m);
          check_status "the holder died" (Unix.WSIGNALED Sys.sigkill) (await z1);
          (* the holder locks, a second process sleeps on the mutex, the
             holder is killed (and not reaped before the sleeper's lock) *)
          let r, w = Unix.pipe ~cloexec:true () in
          let holder =
            fork_child (fun () ->
                Unix.close r;
                Mx.lock h.m;
                ignore (Unix.write_substring w "l" 0 1);
                Unix.sleepf 3600.0;
                false)
          in
          Unix.close w;
          ignore (Unix.read r (Bytes.create 1) 0 1);
          Unix.close r;
          let sleeper = lock_unlock_child h.m in
          (* the sleeper is asleep once the mutex's futex word (offset 16,
             see ocaml_sync_stubs.rs; the pthread mutex of the former
             implementation has its lock word there too) has its top
             "waiters" bit; a kill before that only tests the previous
             case again, so this waits a bounded while, asserting nothing *)
          let asleep () = Int32.compare (String.get_int32_le (Obj.magic h.m : string) 16) 0l < 0 in
          let rec until_asleep k = if k > 0 && not (asleep ()) then (Unix.sleepf 0.001; until_asleep (k - 1)) in
          until_asleep 10_000;
          Unix.kill holder Sys.sigkill;
          check_status "a locker sleeping when the holder died gets it" (Unix.WEXITED 0) (await sleeper);
          Alcotest.(check int) "two takeovers" 2 (Mx.recoveries h.m);
          check_status "the holder died" (Unix.WSIGNALED Sys.sigkill) (await holder)))

(* --- Waiters that die (issue 12, review of the conditions) ---

   A waiter of [wait_e] or [wait] dies at one step of its wait: then the
   live waiters must still be woken by [signal] (one each, none lost, none
   woken twice) and by [broadcast]. The live waiters use the condition as
   programs do: each waits until a ticket is there, takes one and leaves;
   a signaller adds a ticket under the mutex and signals. A signal lost on
   the dead waiter leaves a ticket and a live waiter asleep: [until] then
   fails with a message after a deadline, instead of hanging. The parent
   never takes the mutex itself (a wedged mutex would block it): children
   do, each under the watchdog of [await]. *)

let until what f =
  let deadline = Unix.gettimeofday () +. watchdog_s in
  let rec go () =
    if not (f ()) then
      if Unix.gettimeofday () > deadline then Alcotest.failf "%s (not within %.0f s)" what watchdog_s
      else begin
        Unix.sleepf 0.002;
        go ()
      end
  in
  go ()

let fifo_dir = lazy (
  let d = Filename.concat (Filename.get_temp_dir_name ()) (Printf.sprintf "shmpool-waiters-%d" (Unix.getpid ())) in
  (try Unix.mkdir d 0o700 with Unix.Unix_error (Unix.EEXIST, _, _) -> ());
  at_exit (fun () ->
      if Unix.getpid () = master then begin
        Array.iter (fun f -> try Unix.unlink (Filename.concat d f) with Unix.Unix_error _ -> ()) (try Sys.readdir d with Sys_error _ -> [||]);
        try Unix.rmdir d with Unix.Unix_error _ -> ()
      end);
  d)

let fifo_n = ref 0

let fresh_fifo () =
  incr fifo_n;
  let path = Filename.concat (Lazy.force fifo_dir) (string_of_int !fifo_n) in
  Unix.mkfifo path 0o600;
  path

type kind = Event | Futex

(* How the dying waiter dies: at a point of its own ([commit_hook] or
   [sync_crash_at] names), or killed from outside once asleep. *)
type death = Hook of string | Stub of string | Asleep

(* A child that waits (with [wait_e] on its own pipe, or [wait]) until it
   can take a ticket; exit 0 once it took one. [arm] runs first. *)
let start_waiter ?(arm = ignore) ?entry ?path r h kind =
  let path = match (kind, path) with Event, None -> fresh_fifo () | Event, Some p -> p | Futex, _ -> "" in
  let entry = Option.map (fun f -> f path) entry in
  fork_child (fun () ->
      let heap = Netmcore_ref.heap r in
      let wait =
        match kind with
        | Futex ->
            let we = H.modify heap (fun mu -> C.alloc_wait_entry mu h.ws) in
            fun () -> C.wait we h.c h.m
        | Event ->
            let we = match entry with Some e -> e | None -> H.modify heap (fun mu -> C.alloc_wait_entry_e mu h.ws path) in
            let esys = Unixqueue.create_unix_event_system () in
            fun () ->
              let eng = C.wait_e we h.c h.m esys (fun () -> Uq_engines.epsilon_engine (`Done ()) esys) in
              Unixqueue.run esys;
              match eng#state with `Done () -> () | _ -> failwith "wait_e engine not done"
      in
      arm ();
      Mx.lock h.m;
      h.queued <- h.queued + 1;
      let rec go () =
        if h.tickets > 0 then begin
          h.tickets <- h.tickets - 1;
          h.woken <- h.woken + 1;
          Mx.unlock h.m;
          true
        end
        else begin
          wait ();
          go ()
        end
      in
      go ())

(* [n] tickets handed out and one signal each ([`Signal]), or [n] tickets
   and one broadcast, by a child under the watchdog. *)
let hand_out h how n =
  let p =
    fork_child (fun () ->
        let one () =
          Mx.lock h.m;
          h.tickets <- h.tickets + 1;
          C.signal h.c;
          Mx.unlock h.m
        in
        (match how with
        | `Signal -> one ()
        | `Broadcast ->
            Mx.lock h.m;
            h.tickets <- h.tickets + n;
            C.broadcast h.c;
            Mx.unlock h.m);
        true)
  in
  check_status "the signaller returned" (Unix.WEXITED 0) (await p)

(* Waits until [n] waiters are queued (counted under the mutex just before
   they wait) and the mutex is free again (a child locks it: the last of
   them has released it, so it is in its wait). *)
let until_waiting h n =
  until (Printf.sprintf "%d waiters queued" n) (fun () -> h.queued >= n);
  check_status "the mutex is free again" (Unix.WEXITED 0) (await (lock_unlock_child h.m))

(* The live waiters [live] (already waiting) are woken by tickets handed out
   [how]: each signal wakes exactly one more of them; a broadcast all. *)
let wake_all h how live =
  let n = List.length live in
  let w0 = h.woken in
  (match how with
  | `Signal ->
      List.iteri
        (fun i _ ->
          hand_out h `Signal 1;
          until (Printf.sprintf "signal %d of %d woke a live waiter (a wake-up was lost)" (i + 1) n) (fun () -> h.woken >= w0 + i + 1);
          Alcotest.(check int) (Printf.sprintf "signal %d woke exactly one waiter" (i + 1)) (w0 + i + 1) h.woken)
        live
  | `Broadcast ->
      hand_out h `Broadcast n;
      until (Printf.sprintf "the broadcast woke all %d live waiters" n) (fun () -> h.woken >= w0 + n));
  List.iter (fun p -> check_status "a live waiter took its ticket and left" (Unix.WEXITED 0) (await p)) live;
  Alcotest.(check int) "every ticket taken once" 0 h.tickets;
  Alcotest.(check int) "every live waiter woken once" (w0 + n) h.woken

let arm_death = function
  | Hook name -> fun () -> Struct_internal.commit_hook := fun p -> if p = name then Unix.kill (Unix.getpid ()) Sys.sigkill
  | Stub name -> fun () -> Struct_internal.sync_crash_at name
  | Asleep -> ignore

(* Points at which a dying waiter must first be woken to reach them. *)
let needs_wake = function
  | Hook ("wait_e:woken" | "wait_e:dequeued") | Stub ("cond:dequeue-locked" | "wait:woken") -> true
  | _ -> false

(* The staged death: the dying waiter is the oldest, then three live ones
   (two event waiters, one futex waiter) wait, and are woken [how]. *)
let waiter_dies kind death how () =
  with_pool (fun pool ->
      with_header pool `Normal (fun r h ->
          let d = start_waiter ~arm:(arm_death death) r h kind in
          (match death with
          | Hook "wait_e:enqueued" | Stub "wait:counted" ->
              (* dies holding the mutex: the next locker takes it over *)
              ()
          | _ -> until_waiting h 1);
          if needs_wake death then begin
            (* a signal without a ticket: the dying waiter is the oldest,
               so it is the one woken, and dies at the point *)
            let p = fork_child (fun () -> Mx.lock h.m; C.signal h.c; Mx.unlock h.m; true) in
            check_status "the wake-up signal returned" (Unix.WEXITED 0) (await p)
          end;
          if death = Asleep then Unix.kill d Sys.sigkill;
          check_status "the waiter died at its point" (Unix.WSIGNALED Sys.sigkill) (await d);
          let live = [ start_waiter r h Event; start_waiter r h Futex; start_waiter r h Event ] in
          until_waiting h 4;
          wake_all h how live;
          (* and the condition keeps working for new waiters *)
          let more = [ start_waiter r h Futex; start_waiter r h Event ] in
          until_waiting h 6;
          wake_all h `Signal more))

(* Random kills: a waiter killed at a random moment of its wait while a
   racing child signals and broadcasts without tickets (so every wake-up
   it causes is spurious, and the live waiters go back to waiting); then
   the live waiters must be woken by tickets, one signal each. *)
let random_kills () =
  let rounds = try int_of_string (Sys.getenv "SHMPOOL_WAITER_KILLS") with Not_found | Failure _ -> 40 in
  let rnd = Random.State.make [| 12 |] in
  for round = 1 to rounds do
    with_pool (fun pool ->
        with_header pool `Normal (fun r h ->
            let pick () = if Random.State.bool rnd then Event else Futex in
            let live1 = start_waiter r h (pick ()) in
            until_waiting h 1;
            let d = start_waiter r h (pick ()) in
            let racer =
              fork_child (fun () ->
                  let rnd = Random.State.make [| round |] in
                  while true do
                    Mx.lock h.m;
                    if Random.State.bool rnd then C.signal h.c else C.broadcast h.c;
                    Mx.unlock h.m;
                    Unix.sleepf (Random.State.float rnd 0.002)
                  done;
                  true)
            in
            Unix.sleepf (Random.State.float rnd 0.03);
            Unix.kill d Sys.sigkill;
            ignore (await d);
            Unix.kill racer Sys.sigkill;
            ignore (await racer);
            (* the dying waiter was counted if it got that far *)
            let q = h.queued in
            let live2 = start_waiter r h (pick ()) in
            until_waiting h (q + 1);
            wake_all h (if round mod 2 = 0 then `Signal else `Broadcast) [ live1; live2 ]))
  done

(* An event waiter dies queued; its entry is freed (the wait set lets it
   go, and the heap may reuse its memory at once: simulated by filling the
   entry with garbage). A signal must then reach the live waiter behind it,
   never the freed entry. *)
let free_queued_entry () =
  with_pool (fun pool ->
      with_header pool `Normal (fun r h ->
          let dead_entry = ref None in
          let entry path =
            let e = H.modify (Netmcore_ref.heap r) (fun mu -> C.alloc_wait_entry_e mu h.ws path) in
            dead_entry := Some e;
            e
          in
          let d = start_waiter ~entry r h Event in
          until_waiting h 1;
          Unix.kill d Sys.sigkill;
          check_status "the waiter died queued" (Unix.WSIGNALED Sys.sigkill) (await d);
          let live = start_waiter r h Event in
          until_waiting h 2;
          let dead_entry = Option.get !dead_entry in
          H.modify (Netmcore_ref.heap r) (fun mu -> C.free_wait_entry_e mu h.ws dead_entry);
          let raw : string = Obj.magic dead_entry in
          Bytes.fill (Bytes.unsafe_of_string raw) 0 (String.length raw) '\xff';
          wake_all h `Signal [ live ]))

(* A [`Normal] mutex whose dead holder's pid now belongs to another
   running process (simulated: the holder is recorded as a running process
   with another start time, Struct_internal.mutex_set_holder) is taken
   over by the next locker; a live holder, checked by the same lockers
   while it holds the mutex, is not. *)
let normal_reused_pid () =
  with_pool (fun pool ->
      with_header pool `Normal (fun _ h ->
          (* a process that runs on under the dead holder's pid *)
          let reuser = fork_child (fun () -> Unix.sleepf 3600.0; false) in
          Struct_internal.mutex_set_holder h.m reuser 1;
          check_status "a locker takes over from the dead holder whose pid was reused" (Unix.WEXITED 0) (await (lock_unlock_child h.m));
          Alcotest.(check int) "one takeover" 1 (Mx.recoveries h.m);
          (* the same process as a genuine holder: not taken over *)
          let r, w = Unix.pipe ~cloexec:true () in
          let r2, w2 = Unix.pipe ~cloexec:true () in
          let holder =
            fork_child (fun () ->
                Unix.close r;
                Unix.close w2;
                Mx.lock h.m;
                ignore (Unix.write_substring w "l" 0 1);
                ignore (Unix.read r2 (Bytes.create 1) 0 1);
                Mx.unlock h.m;
                true)
          in
          Unix.close w;
          Unix.close r2;
          ignore (Unix.read r (Bytes.create 1) 0 1);
          Unix.close r;
          let locker = lock_unlock_child h.m in
          (* several of the locker's holder checks (one per 50 ms) pass
             while the holder lives: it must still be waiting *)
          Unix.sleepf 0.3;
          Alcotest.(check bool) "the locker waits while the holder lives" true (fst (Unix.waitpid [ Unix.WNOHANG ] locker) = 0);
          ignore (Unix.write_substring w2 "u" 0 1);
          Unix.close w2;
          check_status "the holder unlocked" (Unix.WEXITED 0) (await holder);
          check_status "then the locker got it" (Unix.WEXITED 0) (await locker);
          Alcotest.(check int) "no takeover of a live holder" 1 (Mx.recoveries h.m);
          Unix.kill reuser Sys.sigkill;
          ignore (await reuser)))

(* An event waiter dies queued, and a new waiter waits on a pipe of the
   same path (a restarted worker given its predecessor's pipe): the dead
   entry's pipe has a reader again, yet a signal must not count the dead
   waiter as woken, it must reach the live one. *)
let dead_waiter_pipe_reused () =
  with_pool (fun pool ->
      with_header pool `Normal (fun r h ->
          let path = fresh_fifo () in
          let d = start_waiter ~path r h Event in
          until_waiting h 1;
          Unix.kill d Sys.sigkill;
          check_status "the waiter died queued" (Unix.WSIGNALED Sys.sigkill) (await d);
          let live = start_waiter ~path r h Event in
          until_waiting h 2;
          wake_all h `Signal [ live ]))

(* A semaphore waiter killed asleep does not take a later post: the next
   waiter gets it. *)
let sem_dead_waiter () =
  with_pool (fun pool ->
      let r = Netmcore_ref.sref pool [| Netmcore_sem.dummy () |] in
      H.modify (Netmcore_ref.heap r) (fun mu -> (Netmcore_ref.deref_ro r).(0) <- Netmcore_sem.create mu 0);
      let s = (Netmcore_ref.deref_ro r).(0) in
      let waiter () = fork_child (fun () -> Netmcore_sem.wait s Netsys_posix.SEM_WAIT_BLOCK; true) in
      (* asleep once counted among the waiters (offset 12, see
         ocaml_sync_stubs.rs); a kill before only tests an earlier step *)
      let waiters () = Int32.to_int (String.get_int32_le (Obj.magic s : string) 12) in
      let until_asleep n = until (Printf.sprintf "%d semaphore waiters asleep" n) (fun () -> waiters () >= n) in
      let d = waiter () in
      until_asleep 1;
      Unix.kill d Sys.sigkill;
      check_status "the waiter died" (Unix.WSIGNALED Sys.sigkill) (await d);
      let l = waiter () in
      until_asleep 2;
      Netmcore_sem.post s;
      check_status "the live waiter got the post" (Unix.WEXITED 0) (await l);
      Alcotest.(check int) "taken once" 0 (Netmcore_sem.getvalue s))

(* Heap words that [f ()] allocates in the heap of [b] (used words after
   minus before; retried if a collection ran meanwhile, which frees
   garbage and so hides allocations). *)
let words_allocated b f =
  let used () =
    let s = H.stats (B.heap b) in
    (s.H.heap_words - s.H.free_words, s.H.gcs)
  in
  let rec go k =
    let u0, g0 = used () in
    f ();
    let u1, g1 = used () in
    if g1 <> g0 && k > 0 then go (k - 1) else u1 - u0
  in
  go 10

(* An add or delete_hd builds only its new small values: a new state
   record, and a new block array (and fresh blocks) when the blocks
   change; not a copy of the buffer's blocks. *)
let buffer_allocation () =
  with_pool (fun pool ->
      let bsize = 4096 in
      let b = B.create pool bsize () in
      Fun.protect
        ~finally:(fun () -> B.destroy b)
        (fun () ->
          let s = String.make 64 'x' in
          (* 2048 * 64 bytes: 32 full blocks, the next add starts a block *)
          for _ = 1 to 2048 do
            B.add_string b s
          done;
          let nblocks = 2048 * 64 / bsize in
          let grow = words_allocated b (fun () -> B.add_string b s) in
          let small = 16 in
          Alcotest.(check bool)
            (Printf.sprintf "an add that starts a block allocates the block, a block array and a state (%d words)" grow)
            true
            (grow >= bsize / 8 && grow <= (bsize / 8) + 1 + nblocks + 2 + small);
          let add = words_allocated b (fun () -> B.add_string b s) in
          Alcotest.(check bool) (Printf.sprintf "an add within a block allocates a state only (%d words)" add) true (add <= small);
          let del = words_allocated b (fun () -> B.delete_hd b 64) in
          Alcotest.(check bool) (Printf.sprintf "delete_hd within a block allocates a state only (%d words)" del) true (del <= small);
          let drop = words_allocated b (fun () -> B.delete_hd b (bsize - 64)) in
          Alcotest.(check bool)
            (Printf.sprintf "delete_hd that drops a block allocates a block array and a state (%d words)" drop)
            true
            (drop <= nblocks + 2 + small);
          Alcotest.(check int) "length" ((2050 * 64) - bsize) (B.length b);
          Alcotest.(check string) "contents" (String.make 64 'x') (B.sub b (B.start b) 64)))

let () =
  Alcotest.run "netmcore sync crashes"
    [
      ( "condition",
        [
          Alcotest.test_case "signaller killed after marking, before writing the pipe" `Quick (signaller_dies "signal:marked");
          Alcotest.test_case "signaller killed after writing the pipe, before unlinking" `Quick (signaller_dies "signal:written");
          Alcotest.test_case "list lock held by an unreaped dead process" `Quick zombie_list_holder;
        ] );
      ( "normal mutex",
        [
          Alcotest.test_case "unlocked by another process or thread" `Quick normal_hand_off;
          Alcotest.test_case "holder killed" `Quick normal_dead_holder;
          Alcotest.test_case "dead holder's pid reused (simulated)" `Quick normal_reused_pid;
        ] );
      ("buffer", [ Alcotest.test_case "add and delete_hd allocate small values only" `Quick buffer_allocation ]);
      ( "dead waiter",
        List.concat_map
          (fun (kind, death, name) ->
            [ Alcotest.test_case (name ^ ", then signals") `Quick (waiter_dies kind death `Signal);
              Alcotest.test_case (name ^ ", then a broadcast") `Quick (waiter_dies kind death `Broadcast) ])
          [ (Event, Hook "wait_e:enqueued", "wait_e: queued, mutex still held");
            (Event, Asleep, "wait_e: asleep in its event loop");
            (Event, Hook "wait_e:woken", "wait_e: woken, entry still queued");
            (Event, Stub "cond:dequeue-locked", "wait_e: unlinking its entry, list locked");
            (Event, Hook "wait_e:dequeued", "wait_e: unlinked, mutex not locked again");
            (Futex, Stub "wait:counted", "wait: counted, mutex still held");
            (Futex, Asleep, "wait: asleep");
            (Futex, Stub "wait:woken", "wait: woken, mutex not locked again") ]
        @ [ Alcotest.test_case "random kills while signals race" `Quick random_kills;
            Alcotest.test_case "free_wait_entry_e of a dead waiter's queued entry" `Quick free_queued_entry;
          Alcotest.test_case "a dead waiter's pipe path reused by a live waiter" `Quick dead_waiter_pipe_reused ] );
      ("semaphore", [ Alcotest.test_case "a waiter killed asleep" `Quick sem_dead_waiter ]);
    ]
