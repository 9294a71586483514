(* Helpers shared by the OCaml suites: unique names, cleanup that also runs
   when a test fails, children that always leave with Unix._exit. *)

let counter = ref 0

let fresh_name prefix =
  incr counter;
  Printf.sprintf "/%s-test-%d-%d" prefix (Unix.getpid ()) !counter

(* Every child forked by a test, so a failing test still kills and reaps
   them (at_exit). *)
let children : int list ref = ref []

let reap pid = try ignore (Unix.waitpid [] pid) with Unix.Unix_error _ -> ()

let kill_children () =
  List.iter (fun pid -> (try Unix.kill pid Sys.sigkill with _ -> ()); reap pid) !children;
  children := []

let names : string list ref = ref []

let unlink_names () =
  List.iter (fun n -> try Unix.unlink ("/dev/shm" ^ n) with _ -> ()) !names;
  names := []

let () = at_exit (fun () -> kill_children (); unlink_names ())

(* [fork f] runs [f] in a child, which exits 0 if [f] returns and 1 if it
   raises; never runs the parent's at_exit handlers. *)
let fork f =
  match Unix.fork () with
  | 0 ->
      let code = try f (); 0 with e -> prerr_endline (Printexc.to_string e); 1 in
      Unix._exit code
  | pid -> children := pid :: !children; pid

let wait_ok pid =
  let _, st = Unix.waitpid [] pid in
  children := List.filter (( <> ) pid) !children;
  match st with
  | Unix.WEXITED 0 -> ()
  | Unix.WEXITED n -> Alcotest.failf "child %d exited %d" pid n
  | Unix.WSIGNALED s -> Alcotest.failf "child %d killed by signal %d" pid s
  | Unix.WSTOPPED _ -> Alcotest.failf "child %d stopped" pid

(* Run [f name] with a fresh shm name that is unlinked afterwards whatever
   happens. *)
let with_name prefix f =
  let n = fresh_name prefix in
  names := n :: !names;
  Fun.protect ~finally:(fun () ->
      (try Unix.unlink ("/dev/shm" ^ n) with _ -> ());
      names := List.filter (( <> ) n) !names)
    (fun () -> f n)
