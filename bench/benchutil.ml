(* What bench.exe, bench_heap.exe and bench_structs.exe share: the common
   options, the shm log scripts/bench.sh cleans up from, the timing loop
   and the alternating rounds of the side benches, and running a
   coordinator as Netmcore's first process in a socket directory the
   master removes at exit. *)

let now = Unix.gettimeofday

(* ----- options (set by [Arg.parse] in each program) ---------------------- *)

let rounds = ref 5
let secs = ref 0.3 (* measuring window of one worker run *)
let out_md = ref "bench.md"
let shm_log = ref "" (* file to which each pool's shm name is appended *)
let sockdir_opt = ref "" (* Netmcore's socket directory (created, removed after) *)

let common_options =
  [
    ("-rounds", Arg.Set_int rounds, "N rounds per implementation (5)");
    ("-secs", Arg.Set_float secs, "S seconds per measurement (0.3)");
    ("-o", Arg.Set_string out_md, "FILE markdown table");
    ("-shm-log", Arg.Set_string shm_log, "FILE append the name of every shm object created");
    ("-sockdir", Arg.Set_string sockdir_opt, "DIR socket directory to create (default: a fresh temp dir)");
  ]

(* The side benches: the common options, and bench.exe's others (which
   scripts/bench.sh passes to every program) accepted and ignored. *)
let parse_side ~out ~usage =
  out_md := out;
  Arg.parse
    (common_options
    @ [
        ("-big-rounds", Arg.Int ignore, " (ignored)");
        ("-only", Arg.String ignore, " (ignored)");
        ("-impl", Arg.String ignore, " (ignored)");
        ("-dat", Arg.String ignore, " (ignored)");
      ])
    (fun _ -> ())
    usage

(* Every pool's shm name goes to the log as soon as it exists, so that
   scripts/bench.sh can unlink it even if the program dies. *)
let log_shm name =
  if !shm_log <> "" then begin
    let oc = open_out_gen [ Open_append; Open_creat; Open_wronly ] 0o600 !shm_log in
    output_string oc (name ^ "\n");
    close_out oc
  end

(* ----- the side benches' measurements ---------------------------------- *)

(* Calls [f i] for i = 0, 1, ... in batches of 100 until [dur] seconds
   have passed: (calls, seconds taken). *)
let timed dur f =
  let n = ref 0 and t0 = now () in
  while now () -. t0 < dur do
    for _ = 1 to 100 do
      f !n;
      incr n
    done
  done;
  (!n, now () -. t0)

(* [nrounds] rounds alternating [measure false] (OCamlnet's) and [measure
   true] (ours): the figures of each side and the distinct errors. *)
let alternate nrounds measure =
  let o = ref [] and u = ref [] and errs = ref [] in
  for _ = 1 to nrounds do
    (match measure false with Ok v -> o := v :: !o | Error e -> errs := ("ocamlnet: " ^ e) :: !errs);
    match measure true with Ok v -> u := v :: !u | Error e -> errs := ("shmpool: " ^ e) :: !errs
  done;
  (!o, !u, List.sort_uniq compare !errs)

(* The upper median (no averaging of the middle two); nan when empty. *)
let median = function
  | [] -> nan
  | l ->
      let a = Array.of_list l in
      Array.sort compare a;
      a.(Array.length a / 2)

(* In the master: runs [fp arg] as Netmcore's first process in -sockdir
   (default: a fresh temp dir named after [name]) and returns its result;
   at exit, in the master only (at_exit also runs in every forked worker),
   calls [cleanup] (unlinking the pools) and removes the directory. *)
let run_master ~name ~cleanup fp jp arg =
  let master = Unix.getpid () in
  let sockdir =
    if !sockdir_opt <> "" then !sockdir_opt
    else Filename.concat (Filename.get_temp_dir_name ()) (Printf.sprintf "%s-%d" name master)
  in
  at_exit (fun () ->
      if Unix.getpid () = master then begin
        cleanup ();
        ignore (Sys.command ("rm -rf " ^ Filename.quote sockdir))
      end);
  Unix.mkdir sockdir 0o700;
  Netmcore.run ~socket_directory:sockdir
    ~first_process:(fun () -> Netmcore_process.start ~inherit_resources:`All fp arg)
    ~extract_result:(fun _ pid -> Netmcore_process.join_nowait jp pid)
    ()

(* In the master: a pool of [bytes] of each implementation (logged, and
   unlinked at exit), then [run_master] with [(orig, ours, !rounds, !secs)].
   Fails when the coordinator returned nothing. *)
let run_on_two_pools ~name ~bytes fp jp =
  let orig_pool = Netmcore_mempool.create_mempool bytes in
  let ours_pool = Shmpool_netmcore.Netmcore_mempool.create_mempool bytes in
  log_shm (Netmcore_mempool.shm_name orig_pool);
  log_shm (Shmpool_netmcore.Netmcore_mempool.shm_name ours_pool);
  let cleanup () =
    (try Netmcore_mempool.unlink_mempool orig_pool with _ -> ());
    try Shmpool_netmcore.Netmcore_mempool.unlink_mempool ours_pool with _ -> ()
  in
  match run_master ~name ~cleanup fp jp (orig_pool, ours_pool, !rounds, !secs) with
  | Some r -> r
  | None -> failwith (name ^ ": the coordinator returned nothing")
