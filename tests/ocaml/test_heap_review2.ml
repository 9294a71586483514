(* Regression tests of the independent review of the heap and structures
   (issues 11 and 12, branch h20-review). Each scenario runs in a forked
   child on a fresh pool, which the parent unlinks whatever happens; a
   child that hangs is killed by the watchdog and the test fails (a hang
   detector, not a time budget). *)
open Shmpool_netmcore
module H = Netmcore_heap

(* Seconds after which a child counts as hung. *)
let watchdog_s = 60

(* Waits for child [pid]: `Ok, `Failed of a message. Kills it when the
   watchdog fires. *)
let wait_child pid =
  Testutil.children := pid :: !Testutil.children;
  let rec wait n =
    match Unix.waitpid [ Unix.WNOHANG ] pid with
    | 0, _ when n > 0 ->
        Unix.sleepf 0.05;
        wait (n - 1)
    | 0, _ ->
        Unix.kill pid Sys.sigkill;
        ignore (Unix.waitpid [] pid);
        Error "hung (killed by the watchdog)"
    | _, Unix.WEXITED 0 -> Ok ()
    | _, Unix.WEXITED n -> Error (Printf.sprintf "exited %d" n)
    | _, (Unix.WSIGNALED s | Unix.WSTOPPED s) -> Error (Printf.sprintf "died of signal %d" s)
  in
  let r = wait (watchdog_s * 20) in
  Testutil.children := List.filter (( <> ) pid) !Testutil.children;
  r

(* Runs [f ()] in a forked child: true = pass. *)
let fork_run f =
  match Unix.fork () with
  | 0 ->
      let ok = try f () with e -> prerr_endline (Printexc.to_string e); false in
      Unix._exit (if ok then 0 else 1)
  | pid -> wait_child pid

let check name = function Ok () -> () | Error e -> Alcotest.failf "%s: %s" name e

let with_pool size f =
  let pool = Netmcore_mempool.create_mempool size in
  Fun.protect ~finally:(fun () -> try Netmcore_mempool.unlink_mempool pool with _ -> ()) (fun () -> f pool)

(* 1. The first use of a heap in a process through [root] (deref_ro,
   get_ro, find_ro ...) opens the heap there, which may grow the table of
   cached roots; [root] indexed the table it had read before the open: a
   read past its end, garbage as the root, a segfault. Every worker that
   reads structures the master created before the fork does this. The
   table grows at handle numbers that depend on what the process opened
   before, so master/worker pairs with 1 to 20 structures are tried. *)
let t_root_first_use () =
  let failures = ref [] in
  for n = 1 to 20 do
    with_pool (16 * 1024 * 1024) (fun pool ->
        let r =
          fork_run (fun () ->
              (* the "master": n shared refs, then a "worker" forked from it *)
              let refs = List.init n (fun i -> Netmcore_ref.sref pool (string_of_int i)) in
              let w =
                fork_run (fun () ->
                    List.for_all (fun x -> x) (List.mapi (fun i r -> Netmcore_ref.deref_ro r = string_of_int i) refs))
              in
              (match w with Error e -> Printf.eprintf "n=%d: worker %s\n%!" n e | Ok () -> ());
              List.iter (fun r -> H.destroy (Netmcore_ref.heap r)) refs;
              w = Ok ())
        in
        match r with Ok () -> () | Error e -> failures := (n, e) :: !failures)
  done;
  if !failures <> [] then
    Alcotest.failf "the worker failed with %s structures"
      (String.concat ", " (List.rev_map (fun (n, _) -> string_of_int n) !failures))

let () =
  Alcotest.run "heap review 2"
    [
      ( "memory safety",
        [ Alcotest.test_case "first use of a heap through root in a worker" `Quick t_root_first_use ] );
    ]
