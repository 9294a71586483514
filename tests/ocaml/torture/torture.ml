(* Shared by the torture suites: size, seed, a supervisor that runs a suite
   in its own session under a deadline and cleans up whatever it leaves
   (processes, shm objects, directories), children that always leave with
   Unix._exit, a shared mailbox, and the stamped alloc/free loop of the
   workers. *)

open Bigarray

type memory = Shmpool.memory

let ps = Shmpool.page_size

(* ----- size and seed ------------------------------------------------------ *)

let scale =
  match Sys.getenv_opt "SHMPOOL_TORTURE" with
  | None -> 1
  | Some s -> ( match int_of_string_opt (String.trim s) with Some n when n >= 1 -> n | _ -> 1)

let seed =
  match Option.bind (Sys.getenv_opt "SHMPOOL_TORTURE_SEED") int_of_string_opt with
  | Some s -> s
  | None -> (Unix.getpid () * 7919) lxor int_of_float (Unix.gettimeofday () *. 1000.) land 0x3fffffff

(* ----- system calls -------------------------------------------------------- *)

(* Our own calls are not under test: restart them on EINTR. *)
let rec retry f x = try f x with Unix.Unix_error (Unix.EINTR, _, _) -> retry f x

let now = Unix.gettimeofday

let sleep s =
  let until = now () +. s in
  let rec go () =
    let left = until -. now () in
    if left > 0. then (retry Unix.sleepf left; go ())
  in
  go ()

let kill pid signal = try Unix.kill pid signal with Unix.Unix_error _ -> ()

(* [/proc/pid/stat]: state and parent pid, or None once the process is gone. *)
let proc_stat pid =
  match open_in (Printf.sprintf "/proc/%d/stat" pid) with
  | exception Sys_error _ -> None
  | ic -> (
      (* the process may vanish between open and read (ESRCH) *)
      let line = try Some (input_line ic) with End_of_file | Sys_error _ -> None in
      close_in_noerr ic;
      match line with
      | None -> None
      | Some l -> (
          let rest = String.sub l (String.rindex l ')' + 2) (String.length l - String.rindex l ')' - 2) in
          match String.split_on_char ' ' rest with
          | state :: ppid :: _ -> Some (state, int_of_string ppid)
          | _ -> None))

(* gone, or a zombie: it will never run again *)
let gone pid = match proc_stat pid with None | Some (("Z" | "X"), _) -> true | Some _ -> false

let wait_gone ?(secs = 5.0) pid =
  let t0 = now () in
  while (not (gone pid)) && now () -. t0 < secs do sleep 0.001 done;
  gone pid

(* What a hung process is doing, on stderr (before it is killed): its
   state, kernel wait channel and system call, and a backtrace if gdb is
   installed. *)
let diagnose pid =
  let read f = try let ic = open_in f in let l = try input_line ic with End_of_file -> "" in close_in ic; l with Sys_error _ -> "?" in
  prerr_endline
    (Printf.sprintf "torture: hung process %d: stat %s | wchan %s | syscall %s" pid
       (read (Printf.sprintf "/proc/%d/stat" pid))
       (read (Printf.sprintf "/proc/%d/wchan" pid))
       (read (Printf.sprintf "/proc/%d/syscall" pid)));
  if Sys.command "command -v gdb >/dev/null 2>&1" = 0 then
    ignore
      (Sys.command
         (Printf.sprintf "timeout 20 gdb -p %d -batch -nx -ex 'thread apply all bt' 2>/dev/null | grep -E '^(#|Thread)' >&2" pid))

(* ----- what a suite leaves behind ----------------------------------------- *)

(* Paths (shm objects as /dev/shm/..., directories) the supervisor removes
   at the end whatever happened; recorded before they are created. *)
let cleanup_var = "SHMPOOL_TORTURE_CLEANUP"

let record_path path =
  match Sys.getenv_opt cleanup_var with
  | None -> ()
  | Some file ->
      let oc = open_out_gen [ Open_append; Open_creat; Open_wronly ] 0o600 file in
      output_string oc (path ^ "\n");
      close_out oc

let counter = ref 0

(* A fresh shm name that the supervisor unlinks in the end if we did not. *)
let shm_name what =
  incr counter;
  let n = Printf.sprintf "/shmpool-torture-%s-%d-%d" what (Unix.getpid ()) !counter in
  record_path ("/dev/shm" ^ n);
  n

let record_shm name = record_path ("/dev/shm" ^ name)

let temp_dir what =
  incr counter;
  let d =
    Filename.concat (Filename.get_temp_dir_name ())
      (Printf.sprintf "shmpool-torture-%s-%d-%d" what (Unix.getpid ()) !counter)
  in
  record_path d;
  Unix.mkdir d 0o700;
  d

let rm_rf path = ignore (Sys.command ("rm -rf " ^ Filename.quote path))

(* Runs [f] with stderr sent to [file] (then restored). Netplex logs each
   killed worker on stderr: the Netmcore suites keep that in a file, shown
   only when something failed. *)
let with_stderr_to file f =
  let saved = Unix.dup Unix.stderr in
  let fd = Unix.openfile file [ Unix.O_WRONLY; Unix.O_CREAT; Unix.O_TRUNC ] 0o600 in
  flush stderr;
  Unix.dup2 fd Unix.stderr;
  Unix.close fd;
  Fun.protect f ~finally:(fun () ->
      flush stderr;
      Unix.dup2 saved Unix.stderr;
      Unix.close saved)

(* ----- children ------------------------------------------------------------ *)

let children : int list ref = ref []

let forget pid = children := List.filter (( <> ) pid) !children

let reap pid = try ignore (retry (Unix.waitpid []) pid) with Unix.Unix_error _ -> ()

let kill_children () =
  List.iter (fun pid -> kill pid Sys.sigkill; reap pid) !children;
  children := []

let () = at_exit kill_children

(* [spawn f]: f runs in a child that exits with f's code, or 1 (with the
   exception on stderr) if f raises; it never runs the parent's at_exit. *)
let spawn f =
  flush_all ();
  match Unix.fork () with
  | 0 ->
      children := [];
      let code =
        try f ()
        with e ->
          prerr_endline ("torture child: " ^ Printexc.to_string e);
          1
      in
      flush_all ();
      Unix._exit code
  | pid ->
      children := pid :: !children;
      pid

type ended = Exited of int | Signaled of int | Timeout

(* Wait for a child at most [secs] seconds; on timeout it is left running. *)
let wait_for ~secs pid =
  let t0 = now () in
  let rec go () =
    match retry (Unix.waitpid [ Unix.WNOHANG ]) pid with
    | 0, _ -> if now () -. t0 > secs then Timeout else (sleep 0.0005; go ())
    | _, Unix.WEXITED c -> forget pid; Exited c
    | _, Unix.WSIGNALED s -> forget pid; Signaled s
    | _, Unix.WSTOPPED _ -> go ()
    | exception Unix.Unix_error (Unix.ECHILD, _, _) -> forget pid; Exited (-1)
  in
  go ()

let kill_and_reap pid =
  kill pid Sys.sigkill;
  reap pid;
  forget pid

(* ----- the supervisor ------------------------------------------------------- *)

external set_subreaper : unit -> bool = "torture_set_subreaper"

let my_children () =
  let me = Unix.getpid () in
  Array.fold_left
    (fun acc d ->
      match int_of_string_opt d with
      | Some pid when pid <> me -> (
          match proc_stat pid with Some (_, ppid) when ppid = me -> pid :: acc | _ -> acc)
      | _ -> acc)
    [] (Sys.readdir "/proc")

(* Reap what has ended; true when no child is left. *)
let rec reap_ended () =
  match Unix.waitpid [ Unix.WNOHANG ] (-1) with
  | 0, _ -> false
  | _ -> reap_ended ()
  | exception Unix.Unix_error (Unix.ECHILD, _, _) -> true
  | exception Unix.Unix_error (Unix.EINTR, _, _) -> reap_ended ()

(* Kill every descendant (orphans come to us: we are a subreaper) and reap
   them; returns how many were still running. *)
let kill_descendants () =
  let t0 = now () in
  let killed = ref [] in
  let rec go () =
    if reap_ended () || now () -. t0 > 10. then ()
    else begin
      List.iter
        (fun pid ->
          if not (gone pid) then begin
            if not (List.mem pid !killed) then killed := pid :: !killed;
            kill pid Sys.sigkill
          end)
        (my_children ());
      sleep 0.001;
      go ()
    end
  in
  go ();
  List.length !killed

(* [main ~suite run]: runs [run] (which prints the summary line and says
   whether everything held) in a child in its own session, reaping orphans
   meanwhile; past [deadline] seconds everything is killed and the suite
   reported as hung. Then every process left is killed and every path
   recorded is removed; leftovers fail the suite. Exits with the status.
   The deadline is $SHMPOOL_TORTURE_DEADLINE seconds, by default 60 plus
   15 per unit of size. *)
let main ~suite (run : unit -> bool) =
  let deadline =
    match Option.bind (Sys.getenv_opt "SHMPOOL_TORTURE_DEADLINE") float_of_string_opt with
    | Some d -> d
    | None -> 60. +. (15. *. float scale)
  in
  let cleanup_file = Filename.temp_file "shmpool-torture-" ".cleanup" in
  Unix.putenv cleanup_var cleanup_file;
  ignore (set_subreaper ());
  Sys.set_signal Sys.sigpipe Sys.Signal_ignore;
  flush_all ();
  let runner =
    match Unix.fork () with
    | 0 ->
        (* the runner: its own session (one kill reaches everything it
           started), a normal exit (its at_exit handlers kill its children) *)
        ignore (Unix.setsid ());
        let ok =
          try run ()
          with e ->
            Printf.printf "torture %s: FAILED: %s\n" suite (Printexc.to_string e);
            false
        in
        exit (if ok then 0 else 1)
    | pid -> pid
  in
  let t0 = now () in
  let rec wait () =
    match Unix.waitpid [ Unix.WNOHANG ] (-1) with
    | 0, _ -> if now () -. t0 > deadline then `Hang else (sleep 0.005; wait ())
    | pid, st when pid = runner -> `Ended st
    | _ -> wait ()
    | exception Unix.Unix_error (Unix.EINTR, _, _) -> wait ()
    | exception Unix.Unix_error (Unix.ECHILD, _, _) -> `Ended (Unix.WEXITED 1)
  in
  let problems = ref [] in
  let outcome = wait () in
  (match outcome with
   | `Hang ->
       kill (-runner) Sys.sigkill;
       problems := Printf.sprintf "HUNG: killed after %.1f s" deadline :: !problems
   | `Ended (Unix.WEXITED _) -> ()
   | `Ended (Unix.WSIGNALED s) -> problems := Printf.sprintf "runner killed by signal %d" s :: !problems
   | `Ended (Unix.WSTOPPED _) -> ());
  let left = kill_descendants () in
  if left > 0 && outcome <> `Hang then
    problems := Printf.sprintf "%d processes left behind (killed)" left :: !problems;
  let paths =
    try
      let ic = open_in cleanup_file in
      let rec lines acc = match input_line ic with l -> lines (l :: acc) | exception End_of_file -> acc in
      let l = lines [] in
      close_in ic;
      List.sort_uniq compare l
    with Sys_error _ -> []
  in
  let shm_left = ref 0 in
  List.iter
    (fun p ->
      if Sys.file_exists p then begin
        if String.length p > 9 && String.sub p 0 9 = "/dev/shm/" then incr shm_left;
        rm_rf p
      end)
    paths;
  (try Sys.remove cleanup_file with Sys_error _ -> ());
  if !shm_left > 0 && outcome <> `Hang then
    problems := Printf.sprintf "%d shm objects left behind (removed)" !shm_left :: !problems;
  List.iter (fun p -> Printf.printf "torture %s: FAILED: %s\n" suite p) (List.rev !problems);
  flush_all ();
  let code = match outcome with `Ended (Unix.WEXITED 0) when !problems = [] -> 0 | _ -> 1 in
  Unix._exit code

(* ----- a mailbox shared with every process forked afterwards --------------- *)

type mailbox = (int64, int64_elt, c_layout) Array1.t

let mailbox words : mailbox =
  let file = Filename.temp_file "shmpool-torture-mb-" "" in
  let fd = Unix.openfile file [ Unix.O_RDWR ] 0o600 in
  Sys.remove file;
  let mb = array1_of_genarray (Unix.map_file fd int64 c_layout true [| words |]) in
  Unix.close fd;
  Array1.fill mb 0L;
  mb

let get (mb : mailbox) i = Int64.to_int mb.{i}
let set (mb : mailbox) i v = mb.{i} <- Int64.of_int v
let bump (mb : mailbox) i = mb.{i} <- Int64.succ mb.{i}

(* ----- stamped blocks -------------------------------------------------------- *)

external get64 : memory -> int -> int64 = "%caml_bigstring_get64"
external set64 : memory -> int -> int64 -> unit = "%caml_bigstring_set64"

(* Each page of a block starts with the block's tag and the page's index;
   the block ends with the tag's complement. A page shared by two live
   blocks loses one of the stamps. *)
let stamp m tag =
  let len = Array1.dim m in
  for p = 0 to (len / ps) - 1 do
    set64 m (p * ps) tag;
    set64 m ((p * ps) + 8) (Int64.of_int p)
  done;
  set64 m (len - 8) (Int64.lognot tag)

let intact m tag =
  let len = Array1.dim m in
  let ok = ref (get64 m (len - 8) = Int64.lognot tag) in
  for p = 0 to (len / ps) - 1 do
    if get64 m (p * ps) <> tag || get64 m ((p * ps) + 8) <> Int64.of_int p then ok := false
  done;
  !ok

(* ----- the workers' loop ------------------------------------------------------ *)

type api = {
  alloc : int -> memory;
  free : memory -> unit;
  size : memory -> int;
  is_oom : exn -> bool;
  flush : unit -> unit;
}

let shmpool_api pool =
  {
    alloc = Shmpool.alloc pool;
    free = Shmpool.free pool;
    size = Shmpool.size pool;
    is_oom = (function Shmpool.Out_of_pool_memory -> true | _ -> false);
    flush = (fun () -> Shmpool.flush_cache pool);
  }

(* Mixed sizes: half 1-4 pages, 30 % 5-64 (the cached sizes), 20 % 65-100. *)
let random_pages rng =
  let r = Random.State.int rng 100 in
  if r < 50 then 1 + Random.State.int rng 4
  else if r < 80 then 5 + Random.State.int rng 60
  else 65 + Random.State.int rng 36

(* Mailbox slot of a worker: [slot_words] words at [base]. *)
let slot_words = 8
let w_pid = 0 (* the worker's Unix pid *)
let w_progress = 1 (* operations done *)
let w_status = 2 (* 0 running, 1 finished *)
let w_violations = 3
let w_ooms = 4
let w_exceptions = 5

(* [churn api mb base ~rng ~ops ~tag]: [ops] random allocs and frees
   (unbounded for [ops = max_int]), holding at most [max_held] stamped
   blocks, verifying each before freeing it and all of them now and then;
   then frees everything, gives its cache back and marks itself finished.
   Violations (a stamp overwritten, a wrong size, an unexpected exception)
   are counted in the mailbox, the first one is printed to stderr. *)
let churn ?(max_held = 12) ?(on_step = ignore) api mb base ~rng ~ops ~tag =
  set mb (base + w_pid) (Unix.getpid ());
  let held = Array.make max_held (Array1.create char c_layout 0, 0L) in
  let n = ref 0 and seq = ref 0 in
  let violation what =
    if get mb (base + w_violations) = 0 then
      prerr_endline (Printf.sprintf "torture worker %d: %s" (Unix.getpid ()) what);
    bump mb (base + w_violations)
  in
  let verify (m, t) = if not (intact m t) then violation "a live block's stamp was overwritten" in
  let free_at i =
    let ((m, _) as b) = held.(i) in
    verify b;
    api.free m;
    decr n;
    held.(i) <- held.(!n)
  in
  let step k =
    if !n > 0 && (!n = max_held || Random.State.int rng 100 < 45) then free_at (Random.State.int rng !n)
    else begin
      let pages = random_pages rng in
      match api.alloc ((pages * ps) - Random.State.int rng ps) with
      | m ->
          incr seq;
          let t = Int64.logor (Int64.shift_left tag 24) (Int64.of_int (!seq land 0xffffff)) in
          if Array1.dim m <> pages * ps then violation "alloc returned a wrong length";
          stamp m t;
          if k land 15 = 0 && api.size m <> pages * ps then violation "size disagrees";
          held.(!n) <- (m, t);
          incr n
      | exception e when api.is_oom e ->
          bump mb (base + w_ooms);
          if !n > 0 then free_at (Random.State.int rng !n)
    end;
    if k land 255 = 0 then for i = 0 to !n - 1 do verify held.(i) done;
    bump mb (base + w_progress);
    on_step k
  in
  (try
     let k = ref 0 in
     while !k < ops do
       incr k;
       step !k
     done;
     while !n > 0 do free_at (!n - 1) done;
     api.flush ()
   with e ->
     bump mb (base + w_exceptions);
     violation ("exception " ^ Printexc.to_string e));
  set mb (base + w_status) 1

(* Print the suite's one line. *)
let report ~suite fmt =
  Printf.ksprintf
    (fun s ->
      print_endline (Printf.sprintf "torture %s: %s" suite s);
      flush stdout)
    fmt
