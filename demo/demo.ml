(* The shmpool demo (`make demo`): a parallel prefix sum over a big array of
   floats, shared between OCamlnet Netmcore processes through a memory pool.

   The master creates a pool (before Netmcore starts), then Netmcore runs a
   first process that drives three parallel phases, each with its own set
   of worker processes forked by Netmcore (inheriting the pool at the same
   address):

   1. fill: each worker allocates a pool block holding a float array (its
      chunk of the big array), fills it and returns the block's address
      and the chunk's sum (the join result is marshalled; the address is a
      plain nativeint);
   2. scan: the first process turns the chunk sums into chunk offsets;
      each worker re-grabs the address of a chunk ([Netsys_mem.grab]),
      allocates an output block and writes the chunk's prefix sums plus
      its offset (the classic two-pass parallel scan);
   3. verify: the first process recomputes everything sequentially and
      compares each of the prefix sums (values are small integers, so
      every sum is exact and the comparison is exact);
   then it frees every block (allocated by other, exited processes), and
   the workers do an allocator workout (alloc/free of 1..16-page blocks).

   The program is written once, as a functor over the signature of
   OCamlnet's Netmcore_mempool, and run with shmpool's drop-in
   (Shmpool_netmcore.Netmcore_mempool) and with OCamlnet's original, for
   comparison. Exit status: 0 verified, 1 wrong result, 2 error. *)

open Printf

module type MEMPOOL = module type of Netmcore_mempool

type config = {
  workers : int;
  mib : int;  (** size of the array of floats, in MiB *)
  pool_mib : int;
  churn : int;  (** alloc/free operations per worker in the workout *)
  inject_error : bool;  (** make one scan worker write one wrong sum *)
}

let now = Unix.gettimeofday
let ms s = s *. 1000.
let mib_of b = float_of_int b /. 1048576.

(* The element at global index [g]: an integer in [0, 1023], so that every
   prefix sum is an integer below 2^53 and exact in a float. *)
let value g = float_of_int ((g * 0x9E3779B1) lsr 16 land 1023)

(* A float array living in a pool block, as seen from any process of the
   Netmcore system: the address is valid in all of them. *)
type block = { addr : nativeint; size : int; voffs : int; n : int }

(* Also returns the time alloc_mem took (init_float_array writes the whole
   block, so it is not part of it). *)
let new_float_block alloc n =
  let t = Unix.gettimeofday () in
  let m = alloc (Netsys_mem.init_float_array_bytelen n) in
  let t_alloc = Unix.gettimeofday () -. t in
  let voffs, _ = Netsys_mem.init_float_array m 0 n in
  let a : float array = Netsys_mem.as_value m voffs in
  ({ addr = Netsys_mem.memory_address m; size = Bigarray.Array1.dim m; voffs; n }, a, t_alloc)

let memory_of b = Netsys_mem.grab b.addr b.size
let float_array_of b : float array = Netsys_mem.as_value (memory_of b) b.voffs

type report = {
  phases : (string * float) list;  (** in order *)
  max_alloc : float;  (** slowest alloc_mem of the fill workers *)
  blocks : int;
  live_bytes : int;  (** bytes of the blocks at the peak *)
  checked : int;
  mismatches : int;
  first_bad : (int * float * float) option;  (** index, got, expected *)
  last_sum : float;
  stats0 : int * int * int;
  stats_peak : int * int * int;
  stats_end : int * int * int;
  whole_again : bool;  (** could all the free space be allocated as one block *)
  stats_final : int * int * int;  (** after that *)
  debug : string;
  extra : string list;
  churn_ops : int;
  churn_loop : float;  (** the slowest worker's alloc/free loop *)
  t_begin : float;  (** when the first process started *)
  t_end : float;  (** when it was done *)
}

let rec rm_rf p =
  match (Unix.lstat p).Unix.st_kind with
  | Unix.S_DIR ->
      Array.iter (fun e -> rm_rf (Filename.concat p e)) (Sys.readdir p);
      Unix.rmdir p
  | _ -> Sys.remove p
  | exception Unix.Unix_error _ -> ()

(* A fresh socket directory for Netmcore. *)
let rec fresh_dir k =
  let d =
    Filename.concat (Filename.get_temp_dir_name ()) (sprintf "shmpool-demo-%d-%d" (Unix.getpid ()) k)
  in
  match Unix.mkdir d 0o700 with
  | () -> d
  | exception Unix.Unix_error (Unix.EEXIST, _, _) -> fresh_dir (k + 1)

(* The pipe on which a run reports to the demo's process (see [in_child]):
   the processes Netmcore forks close their copy first thing, so that the
   demo's process sees end-of-file as soon as the run's process is gone. *)
let report_fd = ref None

let close_report_fd () =
  match !report_fd with
  | Some fd ->
      report_fd := None;
      (try Unix.close fd with Unix.Unix_error _ -> ())
  | None -> ()

module Make
    (Pool : MEMPOOL)
    (L : sig
      val label : string

      val extra : Netmcore.res_id -> string list
      (** more lines for the report, computed at the peak *)
    end) =
struct
  type fill_result = { blk : block; sum : float; alloc_s : float }

  let fill (pool, lo, hi) =
    close_report_fd ();
    let blk, a, alloc_s = new_float_block (Pool.alloc_mem pool) (hi - lo) in
    let s = ref 0.0 in
    for j = 0 to hi - lo - 1 do
      let v = value (lo + j) in
      Array.unsafe_set a j v;
      s := !s +. v
    done;
    { blk; sum = !s; alloc_s }

  let fill_fp, fill_jp = Netmcore_process.def_process fill

  let scan (pool, inp, offset, corrupt) =
    close_report_fd ();
    let x = float_array_of inp in
    let blk, y, _ = new_float_block (Pool.alloc_mem pool) inp.n in
    let acc = ref offset in
    for j = 0 to inp.n - 1 do
      acc := !acc +. Array.unsafe_get x j;
      Array.unsafe_set y j !acc
    done;
    if corrupt then y.(inp.n / 2) <- y.(inp.n / 2) +. 1.0;
    blk

  let scan_fp, scan_jp = Netmcore_process.def_process scan

  (* Random alloc/free of 1..16-page blocks, at most 8 live per worker
     (well under the original's cap of live blocks). *)
  let churn (pool, seed, ops) =
    close_report_fd ();
    let rng = Random.State.make [| seed |] in
    let slots = Array.make 8 None in
    let t = now () in
    for _ = 1 to ops do
      let k = Random.State.int rng 8 in
      match slots.(k) with
      | Some m ->
          Pool.free_mem pool m;
          slots.(k) <- None
      | None ->
          let m = Pool.alloc_mem pool ((1 + Random.State.int rng 16) * Netsys_mem.pagesize) in
          Bigarray.Array1.unsafe_set m 0 'x';
          slots.(k) <- Some m
    done;
    Array.iter (function Some m -> Pool.free_mem pool m | None -> ()) slots;
    now () -. t

  let churn_fp, churn_jp = Netmcore_process.def_process churn

  let start_all fp args =
    List.map (fun a -> Netmcore_process.start ~inherit_resources:`All fp a) args

  let join_all jp what pids =
    List.map
      (fun pid ->
        match Netmcore_process.join jp pid with
        | Some r -> r
        | None -> failwith (sprintf "a %s worker failed" what))
      pids

  (* The first process: runs the phases, returns the report. *)
  let first (cfg, pool) =
    close_report_fd ();
    let t_begin = now () in
    try
      let phases = ref [] in
      let timed name f =
        let t = now () in
        let r = f () in
        phases := (name, now () -. t) :: !phases;
        r
      in
      let w = cfg.workers in
      let n = cfg.mib * 1048576 / 8 in
      let stats0 = Pool.stats pool in
      let fills =
        timed "fill" (fun () ->
            join_all fill_jp "fill"
              (start_all fill_fp (List.init w (fun i -> (pool, i * n / w, (i + 1) * n / w)))))
      in
      let offsets =
        let acc = ref 0.0 in
        List.map
          (fun f ->
            let o = !acc in
            acc := !acc +. f.sum;
            o)
          fills
      in
      let outs =
        timed "scan" (fun () ->
            join_all scan_jp "scan"
              (start_all scan_fp
                 (List.mapi
                    (fun i (f, o) -> (pool, f.blk, o, cfg.inject_error && i = w / 2))
                    (List.combine fills offsets))))
      in
      let all = List.map (fun f -> f.blk) fills @ outs in
      let stats_peak = Pool.stats pool in
      let debug = Pool.debug_info pool in
      let extra = L.extra pool in
      let checked, mismatches, first_bad, last_sum =
        timed "verify" (fun () ->
            let acc = ref 0.0 and g = ref 0 and bad = ref 0 and first_bad = ref None in
            List.iter
              (fun b ->
                let y = float_array_of b in
                for j = 0 to b.n - 1 do
                  acc := !acc +. value !g;
                  if y.(j) <> !acc then begin
                    incr bad;
                    if !first_bad = None then first_bad := Some (!g, y.(j), !acc)
                  end;
                  incr g
                done)
              outs;
            if !g <> n then incr bad;
            (!g, !bad, !first_bad, !acc))
      in
      timed "free" (fun () -> List.iter (fun b -> Pool.free_mem pool (memory_of b)) all);
      let loops =
        timed "churn" (fun () ->
            join_all churn_jp "churn"
              (start_all churn_fp (List.init w (fun i -> (pool, i + 1, cfg.churn)))))
      in
      let stats_end = Pool.stats pool in
      (* is all of the free space usable again, as one block? *)
      let _, free_end, _ = stats_end in
      let whole_again =
        match Pool.alloc_mem pool free_end with
        | m ->
            Pool.free_mem pool m;
            true
        | exception Pool.Out_of_pool_memory -> false
      in
      Ok
        {
          phases = List.rev !phases;
          max_alloc = List.fold_left (fun m f -> max m f.alloc_s) 0.0 fills;
          blocks = List.length all;
          live_bytes = List.fold_left (fun s b -> s + b.size) 0 all;
          checked;
          mismatches;
          first_bad;
          last_sum;
          stats0;
          stats_peak;
          stats_end;
          whole_again;
          stats_final = Pool.stats pool;
          debug;
          extra;
          churn_ops = w * cfg.churn;
          churn_loop = List.fold_left max 0.0 loops;
          t_begin;
          t_end = now ();
        }
    with e -> Error (Printexc.to_string e)

  let first_fp, first_jp = Netmcore_process.def_process first

  (* In the master: create the pool, run the Netmcore system, clean up
     (the pool is unlinked even on failure, and by at_exit as a last
     resort; only ever by the master, not by the forked processes). *)
  let run ~announce cfg =
    let master = Unix.getpid () in
    let t0 = now () in
    let pool = Pool.create_mempool (cfg.pool_mib * 1048576) in
    let t_create = now () -. t0 in
    let unlinked = ref false in
    let cleanup () =
      if Unix.getpid () = master && not !unlinked then begin
        unlinked := true;
        try Pool.unlink_mempool pool with _ -> ()
      end
    in
    at_exit cleanup;
    let dir = fresh_dir 0 in
    announce (Pool.shm_name pool) dir;
    let t_run = now () in
    let result =
      Fun.protect
        ~finally:(fun () ->
          if Unix.getpid () = master then begin
            cleanup ();
            rm_rf dir
          end)
        (fun () ->
          try
            match
              Netmcore.run ~socket_directory:dir
                ~first_process:(fun a ->
                  Netmcore_process.start ~inherit_resources:`All first_fp a)
                ~extract_result:(fun _ pid -> Netmcore_process.join_nowait first_jp pid)
                (cfg, pool)
            with
            | Some r -> r
            | None -> Error "the first process failed"
          with e -> Error (Printexc.to_string e))
    in
    let t_stop = now () in
    (L.label, t_create, now () -. t0, (t_run, t_stop), result)
end

module Ours =
  Make
    (Shmpool_netmcore.Netmcore_mempool)
    (struct
      let label = "ours: Shmpool_netmcore.Netmcore_mempool"

      let extra pool =
        let p = Shmpool_netmcore.shmpool pool in
        let owners = Shmpool.owners p in
        [
          (match Shmpool.check p with
          | [] -> "Shmpool.check: sound"
          | l -> "Shmpool.check: " ^ String.concat "; " l);
          sprintf "Shmpool.owners: %d blocks held by %d processes (%d of them exited)"
            (List.fold_left (fun s o -> s + o.Shmpool.blocks) 0 owners)
            (List.length owners)
            (List.length (List.filter (fun o -> not o.Shmpool.alive) owners));
        ]
    end)

module Orig =
  Make
    (Netmcore_mempool)
    (struct
      let label = "orig: OCamlnet's Netmcore_mempool"
      let extra _ = []
    end)

(* The lines both pools print (sizes, allocations, the free runs or the
   first free list), each cut to 100 characters. *)
let shorten_debug d =
  let lines = String.split_on_char '\n' d |> List.filter (( <> ) "") in
  let starts p l = String.length l >= String.length p && String.sub l 0 (String.length p) = p in
  let shown l =
    List.exists (fun p -> starts p l) [ "pool_"; "allocations"; "free runs"; "free_list[0]" ]
  in
  let cut l = if String.length l > 100 then String.sub l 0 97 ^ "..." else l in
  List.iter (fun l -> if shown l then printf "      %s\n" (cut l)) lines;
  let hidden = List.length (List.filter (fun l -> not (shown l)) lines) in
  if hidden > 0 then printf "      ... (%d more lines)\n" hidden

let print_stats what (t, f, c) = printf "    stats %-5s total=%d free=%d contiguous=%d\n" what t f c

(* Prints one run; returns its status (0 verified, 1 wrong, 2 error) and
   its phase timings. *)
let print_run cfg (label, t_create, t_total, (t_run, t_stop), result) =
  printf "\n== %s\n" label;
  printf "    pool: create_mempool %d MiB in %.1f ms\n" cfg.pool_mib (ms t_create);
  match result with
  | Error e ->
      printf "    ERROR: %s\n%!" e;
      (2, [])
  | Ok r ->
      let w = cfg.workers in
      let describe = function
        | "fill" -> sprintf "fill   (%d workers, alloc + write)" w
        | "scan" -> sprintf "scan   (%d workers, read + alloc + write)" w
        | "verify" -> "verify (first process, sequential)"
        | "free" -> sprintf "free   (%d blocks)" r.blocks
        | "churn" -> sprintf "churn  (%d workers x %d alloc/free)" w cfg.churn
        | p -> p
      in
      List.iter (fun (p, t) -> printf "    %-44s %8.1f ms\n" (describe p) (ms t)) r.phases;
      printf "    %-44s %8.1f ms\n" "total (create, startup .. shutdown)" (ms t_total);
      printf "    (Netmcore: %.1f ms until the first process ran, %.1f ms from its end to shutdown)\n"
        (ms (r.t_begin -. t_run)) (ms (t_stop -. r.t_end));
      printf "    slowest alloc_mem in fill: %.3f ms\n" (ms r.max_alloc);
      printf "    churn loops: %d alloc_mem/free_mem in %.1f ms (%.2f us per op in each of %d processes)\n"
        r.churn_ops (ms r.churn_loop)
        (r.churn_loop *. 1e6 *. float_of_int w /. float_of_int (max 1 r.churn_ops))
        w;
      print_stats "start" r.stats0;
      print_stats "peak" r.stats_peak;
      print_stats "end" r.stats_end;
      let _, f0, _ = r.stats0 and _, fe, _ = r.stats_end in
      printf "    %d blocks, %.1f MiB live at the peak; all memory back at the end: %s\n" r.blocks
        (mib_of r.live_bytes)
        (if f0 = fe then "yes" else sprintf "NO (%d bytes missing)" (f0 - fe));
      let _, _, ce = r.stats_end in
      if ce <> fe || not r.whole_again then begin
        printf "    alloc_mem of all the free space (%d bytes) at the end: %s\n" fe
          (if r.whole_again then "succeeded" else "Out_of_pool_memory");
        print_stats "after" r.stats_final
      end;
      List.iter (printf "    %s\n") r.extra;
      printf "    debug_info at the peak (shortened):\n";
      shorten_debug r.debug;
      if r.mismatches = 0 && r.checked = cfg.mib * 1048576 / 8 then begin
        printf "    VERIFIED: all %d prefix sums equal the sequential ones (last = %.0f)\n%!"
          r.checked r.last_sum;
        (0, r.phases @ [ ("loops", r.churn_loop); ("total", t_total) ])
      end
      else begin
        (match r.first_bad with
        | Some (g, got, exp) ->
            printf "    WRONG RESULT: %d of %d prefix sums differ (first at index %d: %.0f, expected %.0f)\n%!"
              r.mismatches r.checked g got exp
        | None -> printf "    WRONG RESULT: %d sums checked, %d expected\n%!" r.checked (cfg.mib * 1048576 / 8));
        (1, r.phases @ [ ("loops", r.churn_loop); ("total", t_total) ])
      end

(* What a run's process tells the demo's process. *)
type msg =
  | Created of string * string  (** the pool's shm name, the socket directory *)
  | Done of (int * (string * float) list)

let interrupted = ref false

(* Runs [f] in a child process, which becomes the Netmcore master: each
   pool gets a fresh Netmcore (its global state, e.g. the registry of
   persistent objects in the socket directory, outlives a run), and a crash
   of one run cannot take the other down. The child reports the names of
   what it created, so that they are removed even if it is killed (e.g. by
   Ctrl-C, which kills the whole process group but not this process). *)
let in_child f =
  flush_all ();
  let rd, wr = Unix.pipe ~cloexec:true () in
  match Unix.fork () with
  | 0 ->
      Sys.set_signal Sys.sigint Sys.Signal_default;
      Unix.close rd;
      report_fd := Some wr;
      let oc = Unix.out_channel_of_descr wr in
      let send (m : msg) =
        Marshal.to_channel oc m [];
        flush oc
      in
      let r =
        try f ~announce:(fun name dir -> send (Created (name, dir)))
        with e ->
          printf "    ERROR: %s\n%!" (Printexc.to_string e);
          (2, [])
      in
      send (Done r);
      exit (fst r)
  | pid ->
      Unix.close wr;
      let ic = Unix.in_channel_of_descr rd in
      let created = ref [] in
      let rec loop () =
        match (Marshal.from_channel ic : msg) with
        | Created (name, dir) ->
            created := (name, dir) :: !created;
            loop ()
        | Done r -> r
        | exception (End_of_file | Failure _) ->
            printf "    ERROR: the run's process died%s\n%!"
              (if !interrupted then " (interrupted)" else "");
            (2, [])
      in
      let r = loop () in
      close_in ic;
      let rec wait () =
        match Unix.waitpid [] pid with
        | _ -> ()
        | exception Unix.Unix_error (Unix.EINTR, _, _) -> wait ()
      in
      wait ();
      (* normally already done by the child; then these fail, quietly *)
      List.iter
        (fun (name, dir) ->
          (try Netsys_posix.shm_unlink name with _ -> ());
          rm_rf dir)
        !created;
      r

let () =
  let workers = ref 4 and mib = ref 64 and pool_mib = ref 0 and only = ref "both"
  and churn = ref 50000 and inject = ref false in
  let spec =
    Arg.align
      [
        ("-workers", Arg.Set_int workers, "N worker processes per phase (default 4)");
        ("-mib", Arg.Set_int mib, "N size of the array of floats in MiB (default 64)");
        ( "-pool-mib",
          Arg.Set_int pool_mib,
          "N pool size in MiB (default 2*mib + 4 + mib/32: input, output and headroom)" );
        ( "-only",
          Arg.Symbol ([ "ours"; "orig"; "both" ], fun s -> only := s),
          " run on one pool only (default both)" );
        ("-churn", Arg.Set_int churn, "N alloc/free operations per worker in the workout (default 50000)");
        ("-inject-error", Arg.Set inject, " corrupt one sum (to see the verification fail)");
      ]
  in
  let usage = "demo.exe [options]: parallel prefix sum on a shared-memory pool, ours vs OCamlnet's" in
  Arg.parse spec (fun a -> raise (Arg.Bad ("unexpected argument " ^ a))) usage;
  if !workers < 1 || !mib < 1 || !churn < 0 || !pool_mib < 0 then begin
    prerr_endline "demo: -workers and -mib must be >= 1, -churn and -pool-mib >= 0";
    exit 2
  end;
  let pool_mib = if !pool_mib > 0 then !pool_mib else (2 * !mib) + 4 + ((!mib + 31) / 32) in
  let cfg = { workers = !workers; mib = !mib; pool_mib; churn = !churn; inject_error = !inject } in
  printf "shmpool demo: parallel prefix sum of %d floats (%d MiB) by %d worker processes,\n"
    (cfg.mib * 1048576 / 8) cfg.mib cfg.workers;
  printf "through a %d MiB Netmcore memory pool (%d CPUs online)\n%!" cfg.pool_mib
    (try
       let ic = Unix.open_process_in "nproc" in
       let n = int_of_string (String.trim (input_line ic)) in
       ignore (Unix.close_process_in ic);
       n
     with _ -> 0);
  Sys.set_signal Sys.sigint (Sys.Signal_handle (fun _ -> interrupted := true));
  let ours =
    if !only <> "orig" then [ in_child (fun ~announce -> print_run cfg (Ours.run ~announce cfg)) ]
    else []
  in
  let orig =
    if !only <> "ours" && not !interrupted then
      [ in_child (fun ~announce -> print_run cfg (Orig.run ~announce cfg)) ]
    else []
  in
  let runs = ours @ orig in
  (match runs with
  | [ (0, ours); (0, orig) ] ->
      printf "\n== comparison (ratio = time of the original / time of ours; > 1: ours faster)\n";
      let row label t t' =
        printf "    %-36s ours %8.1f ms  orig %8.1f ms  ratio %5.2f\n" label (ms t) (ms t') (t' /. t)
      in
      let phases = [ "fill"; "scan"; "verify"; "free"; "churn" ] in
      List.iter (fun p -> row ("phase " ^ p) (List.assoc p ours) (List.assoc p orig)) phases;
      let sum l = List.fold_left (fun s p -> s +. List.assoc p l) 0.0 phases in
      row "all five phases" (sum ours) (sum orig);
      row "alloc/free loops only (allocator)" (List.assoc "loops" ours) (List.assoc "loops" orig);
      row "whole run (with Netmcore start/stop)" (List.assoc "total" ours) (List.assoc "total" orig)
  | _ -> ());
  if !interrupted then begin
    printf "\nRESULT: interrupted\n%!";
    exit 130
  end;
  let status = List.fold_left (fun s (st, _) -> max s st) 0 runs in
  printf "\nRESULT: %s\n%!"
    (match status with
    | 0 -> "VERIFIED on every pool run"
    | 1 -> "WRONG RESULT (see above)"
    | _ -> "ERROR (see above)");
  exit status
