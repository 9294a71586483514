(* Helpers of the suites that run Netmcore workers: a mailbox page of
   8-byte little-endian words that the master allocates and every worker
   grabs by address, polling it, and a socket directory per Netmcore.run. *)

(* Word [slot] of the mailbox page [mb]. *)
let get mb slot =
  let b = Bytes.create 8 in
  Netsys_mem.blit_memory_to_bytes mb (slot * 8) b 0 8;
  Int64.to_int (Bytes.get_int64_le b 0)

let set mb slot v =
  let b = Bytes.create 8 in
  Bytes.set_int64_le b 0 (Int64.of_int v);
  Netsys_mem.blit_bytes_to_memory b 0 mb (slot * 8) 8

(* Polls [f] every [poll] seconds; Failure naming [what] after [timeout]
   seconds, so that a dead peer fails the test instead of hanging it. *)
let wait_until ~timeout ~poll what f =
  let t0 = Unix.gettimeofday () in
  while not (f ()) do
    if Unix.gettimeofday () -. t0 > timeout then failwith ("timeout waiting for " ^ what);
    Unix.sleepf poll
  done

(* A fresh directory for Netmcore's sockets, named after [prefix] and the
   pid, removed at exit. at_exit also runs in every Netmcore worker
   (forked from the master) when it exits: only the master removes it. *)
let sockdir prefix =
  let dir = Filename.concat (Filename.get_temp_dir_name ()) (Printf.sprintf "%s-%d" prefix (Unix.getpid ())) in
  Unix.mkdir dir 0o700;
  let master = Unix.getpid () in
  at_exit (fun () -> if Unix.getpid () = master then ignore (Sys.command ("rm -rf " ^ Filename.quote dir)));
  dir

(* Runs [fp arg] as Netmcore's first process in a subdirectory of its own
   of [sockdir] (one Netmcore.run per directory), and returns its result
   (None if it returned nothing). *)
let runs = ref 0

let netmcore_run sockdir fp jp arg =
  incr runs;
  let dir = Filename.concat sockdir (string_of_int !runs) in
  Unix.mkdir dir 0o700;
  Netmcore.run ~socket_directory:dir
    ~first_process:(fun () -> Netmcore_process.start ~inherit_resources:`All fp arg)
    ~extract_result:(fun _ pid -> Netmcore_process.join_nowait jp pid)
    ()
