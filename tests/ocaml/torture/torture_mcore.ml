(* Torture's worker loop on a Shmpool_netmcore pool (by res_id): the
   Netmcore suites' [api]. Apart from Torture so that the shmpool-only
   suites do not link netmulticore. *)

module M = Shmpool_netmcore.Netmcore_mempool

let netmcore_api pool =
  {
    Torture.alloc = M.alloc_mem pool;
    free = M.free_mem pool;
    size = M.size_mem pool;
    is_oom = (function M.Out_of_pool_memory -> true | _ -> false);
    flush = (fun () -> Shmpool.flush_cache (Shmpool_netmcore.shmpool pool));
  }

(* [run_first ~name ~pool_bytes fork join seed] runs a Netmcore program
   whose first process is [fork] started with a fresh pool of [pool_bytes]
   and [seed] ([fork], [join]: of Netmcore_process.def_process), stderr
   (Netmcore's own messages) going to a log file. Returns the pool, the
   first process's result ([None]: it returned nothing) and the log's
   path. The pool, the socket directory and the log are removed at exit,
   by this process only: at_exit runs in the Netmcore workers forked from
   here too. *)
let run_first ~name ~pool_bytes fork join seed =
  let master = Unix.getpid () in
  let sockdir = Torture.temp_dir name in
  let pool = M.create_mempool pool_bytes in
  Torture.record_shm (M.shm_name pool);
  at_exit (fun () ->
      if Unix.getpid () = master then begin
        (try M.unlink_mempool pool with _ -> ());
        Torture.rm_rf sockdir
      end);
  let log = Filename.temp_file ("shmpool-" ^ name ^ "-") ".log" in
  Torture.record_path log;
  at_exit (fun () -> if Unix.getpid () = master then try Sys.remove log with Sys_error _ -> ());
  let result =
    Torture.with_stderr_to log (fun () ->
        Netmcore.run ~socket_directory:sockdir
          ~first_process:(fun () -> Netmcore_process.start ~inherit_resources:`All fork (pool, seed))
          ~extract_result:(fun _ pid -> Netmcore_process.join_nowait join pid)
          ())
  in
  (pool, result, log)

(* Copies log [log] to stderr, but for each killed worker's expected
   "terminated with signal -7". *)
let show_log log =
  let ic = open_in log in
  (try
     while true do
       let l = input_line ic in
       match Str.search_forward (Str.regexp_string "signal -7") l 0 with
       | _ -> ()
       | exception Not_found -> prerr_endline l
     done
   with End_of_file -> ());
  close_in ic
