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

type hdr = { mutable m : Mx.mutex; mutable c : C.condition; mutable ws : C.wait_set; mutable queued : int }

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
  let r = Netmcore_ref.sref pool { m = Mx.dummy (); c = C.dummy_condition (); ws = C.dummy_wait_set (); queued = 0 } in
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
        ] );
      ("buffer", [ Alcotest.test_case "add and delete_hd allocate small values only" `Quick buffer_allocation ]);
    ]
