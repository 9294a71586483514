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

(* [watch_child ?watchdog_s pid] waits for child [pid], kept in [children]
   meanwhile so that a failing test still kills it: [Ok ()] if it exited 0,
   [Error how] otherwise. A child still running after [watchdog_s] seconds
   is killed and reported hung: a hang detector, not a time budget. *)
let watch_child ?(watchdog_s = 60) pid =
  if not (List.mem pid !children) then children := pid :: !children;
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
  children := List.filter (( <> ) pid) !children;
  r

(* [fork_bool f] forks a child that runs [f ()] and exits 0 if it returned
   true, 1 if false or if it raised (the exception printed); never runs the
   parent's at_exit handlers. Returns the child's pid, already in
   [children]. *)
let fork_bool f =
  match Unix.fork () with
  | 0 ->
      let ok = try f () with e -> prerr_endline (Printexc.to_string e); false in
      Unix._exit (if ok then 0 else 1)
  | pid -> children := pid :: !children; pid

(* [fork_run f]: [f ()] in a child ([fork_bool]), waited for by
   [watch_child]: [Ok ()] = it returned true. *)
let fork_run ?watchdog_s f = watch_child ?watchdog_s (fork_bool f)

(* Fails test [name] unless a [watch_child] result is [Ok]. *)
let check_child name = function Ok () -> () | Error e -> Alcotest.failf "%s: %s" name e

(* Run [f name] with a fresh shm name that is unlinked afterwards whatever
   happens. *)
let with_name prefix f =
  let n = fresh_name prefix in
  names := n :: !names;
  Fun.protect ~finally:(fun () ->
      (try Unix.unlink ("/dev/shm" ^ n) with _ -> ());
      names := List.filter (( <> ) n) !names)
    (fun () -> f n)

(* Runs of one side of a differential test in a child process of their
   own, so that a crash of either implementation names its side and does
   not take the whole suite down. The child logs the name of every shared
   memory object it creates ([log_pool]); the parent removes them all once
   the child has ended, however it ended, so /dev/shm stays clean. *)
type outcome = Finished of string | Crashed of string

(* In such a child: the file its objects' names are appended to. *)
let pool_log = ref ""

let log_pool name =
  if !pool_log <> "" then begin
    let oc = open_out_gen [ Open_append; Open_creat ] 0o600 !pool_log in
    output_string oc (name ^ "\n");
    close_out oc
  end

let unlink_logged file =
  (match open_in file with
  | ic ->
      (try
         while true do
           let n = input_line ic in
           if n <> "" then
             try Unix.unlink ("/dev/shm" ^ if n.[0] = '/' then n else "/" ^ n) with Unix.Unix_error _ -> ()
         done
       with End_of_file -> ());
      close_in ic
  | exception Sys_error _ -> ());
  try Sys.remove file with Sys_error _ -> ()

(* [isolated f] runs [f ()] in a child and returns its result string, or
   how the child ended if it did not finish: killed by a signal, an
   exception, or still running after [watchdog_s] seconds (then it is
   killed: a hang fails instead of blocking the suite). *)
let signal_name s =
  let known = Sys.[ (sigsegv, "SIGSEGV"); (sigbus, "SIGBUS"); (sigabrt, "SIGABRT"); (sigkill, "SIGKILL"); (sigill, "SIGILL"); (sigfpe, "SIGFPE"); (sigterm, "SIGTERM") ] in
  match List.assoc_opt s known with Some n -> n | None -> Printf.sprintf "signal %d (OCaml's number)" s

let isolated ?(watchdog_s = 600.0) (f : unit -> string) : outcome =
  let out = Filename.temp_file "shmpool-isolated" ".out" in
  let plog = Filename.temp_file "shmpool-isolated" ".pools" in
  flush_all ();
  (* OCamlnet 4.1.9's side segfaults (in Netmcore_heap.add under
     Netmcore_queue.push, seen with a core dump) in every child forked once
     the parent's OCaml heap has grown by a few traces read back, and in no
     child forked from a compacted heap (60 seeds x 3 structures): it
     depends on the heap layout it inherits. Compacting first keeps its
     side comparable. *)
  Gc.compact ();
  Fun.protect
    ~finally:(fun () ->
      (try Sys.remove out with Sys_error _ -> ());
      unlink_logged plog)
    (fun () ->
      match Unix.fork () with
      | 0 ->
          children := [];
          names := [];
          pool_log := plog;
          let code =
            match f () with
            | s ->
                let oc = open_out_bin out in
                output_string oc s;
                close_out oc;
                0
            | exception e ->
                prerr_endline ("isolated run: " ^ Printexc.to_string e);
                3
          in
          Unix._exit code
      | pid ->
          children := pid :: !children;
          let deadline = Unix.gettimeofday () +. watchdog_s in
          let rec await pause =
            match Unix.waitpid [ Unix.WNOHANG ] pid with
            | 0, _ when Unix.gettimeofday () > deadline ->
                (try Unix.kill pid Sys.sigkill with Unix.Unix_error _ -> ());
                ignore (Unix.waitpid [] pid);
                None
            | 0, _ ->
                Unix.sleepf pause;
                await (Float.min 0.05 (pause *. 2.))
            | _, st -> Some st
            | exception Unix.Unix_error (Unix.EINTR, _, _) -> await pause
          in
          let st = await 0.001 in
          children := List.filter (( <> ) pid) !children;
          match st with
          | Some (Unix.WEXITED 0) ->
              let ic = open_in_bin out in
              let s = really_input_string ic (in_channel_length ic) in
              close_in ic;
              Finished s
          | Some (Unix.WEXITED c) -> Crashed (Printf.sprintf "exited %d" c)
          | Some (Unix.WSIGNALED s) -> Crashed ("killed by " ^ signal_name s)
          | Some (Unix.WSTOPPED s) -> Crashed ("stopped by " ^ signal_name s)
          | None -> Crashed (Printf.sprintf "still running after %.0f s (killed by the watchdog)" watchdog_s))

(* Notes for the end of the run (alcotest hides a test's own output): a
   crash of OCamlnet's side of a differential is reported, not failed. *)
let notes = ref []

let note fmt =
  Printf.ksprintf
    (fun s ->
      notes := s :: !notes;
      match Sys.getenv_opt "SHMPOOL_SKIP_LOG" with
      | Some f when f <> "" -> (
          try
            let oc = open_out_gen [ Open_append; Open_creat ] 0o600 f in
            output_string oc ("SKIPPED: " ^ s ^ "\n");
            close_out oc
          with Sys_error _ -> ())
      | _ -> ())
    fmt

let () = at_exit (fun () -> List.iter (fun s -> prerr_endline ("NOTE: " ^ s)) (List.rev !notes))

(* Compares the traces of a differential run ([ocamlnet], [ours]): a crash
   of ours fails, a crash of OCamlnet's is noted and the comparison is
   skipped; otherwise the first differing line fails. *)
let compare_traces ~what (orig : outcome) (ours : outcome) =
  match (orig, ours) with
  | _, Crashed how -> Alcotest.failf "%s: ours (shmpool) %s" what how
  | Crashed how, Finished _ -> note "%s: OCamlnet's side %s (ours finished); not compared" what how
  | Finished a, Finished b ->
      if a <> b then begin
        let la = String.split_on_char '\n' a and lb = String.split_on_char '\n' b in
        let cut s = if String.length s > 200 then String.sub s 0 200 ^ "..." else s in
        let rec first i = function
          | x :: xs, y :: ys -> if x = y then first (i + 1) (xs, ys) else Alcotest.failf "%s op %d: ocamlnet %S, ours %S" what i (cut x) (cut y)
          | _ -> Alcotest.failf "%s: lengths differ" what
        in
        first 1 (la, lb)
      end
