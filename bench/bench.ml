(* `make bench`: OCamlnet's Netmcore_mempool against the drop-in
   Shmpool_netmcore.Netmcore_mempool, in one run, as users run them: both
   pools created by the master before Netmcore.startup, workers started with
   Netmcore_process.start ~inherit_resources:`All, timing inside the workers,
   results returned through join. Rounds alternate orig, ours, orig, ours...

   The workloads are written once, as a functor over the Netmcore_mempool
   signature. Writes a markdown table, a data file of the speed-ups (for
   gnuplot) and the goal verdicts. BENCH_TRACE=1 in the environment prints
   every worker's window, ops and context switches (stderr). *)

module type MEMPOOL = module type of Netmcore_mempool

module Orig = Netmcore_mempool
module Ours = Shmpool_netmcore.Netmcore_mempool

let page = Netsys_mem.pagesize
let mib = 1024 * 1024
let now = Benchutil.now

(* ----- options ---------------------------------------------------------- *)

(* -rounds, -secs, -o, -shm-log and -sockdir are Benchutil's *)
let rounds = Benchutil.rounds
let secs = Benchutil.secs
let out_md = Benchutil.out_md
let sockdir_opt = Benchutil.sockdir_opt
let create_rounds_big = ref 3 (* 1 GiB with alloc_really: seconds each *)
let out_dat = ref "ratios.dat"
let only = ref "" (* substring filter on case names, for quick checks *)
let impls = ref "both" (* or "orig", "ours": for profiling one side *)

let () =
  Arg.parse
    (Benchutil.common_options
    @ [
        ("-big-rounds", Arg.Set_int create_rounds_big, "N rounds of create 1 GiB alloc_really (3)");
        ("-dat", Arg.Set_string out_dat, "FILE speed-ups for gnuplot");
        ("-only", Arg.Set_string only, "S1|S2.. run only the cases whose name contains one of these");
        ("-impl", Arg.Symbol ([ "both"; "orig"; "ours" ], fun s -> impls := s), " run only one implementation (profiling)");
      ])
    (fun _ -> ())
    "bench.exe [options]"

let contains s sub =
  let n = String.length s and m = String.length sub in
  let rec go i = i + m <= n && (String.sub s i m = sub || go (i + 1)) in
  m = 0 || go 0

let selected name = List.exists (contains name) (String.split_on_char '|' !only)

let log_shm = Benchutil.log_shm

(* ----- the cases -------------------------------------------------------- *)

type sizes = Pages of int | Mixed  (** uniform 1..64 pages *) | Range of int * int  (** uniform lo..hi pages *)

type kind =
  | Ring of { live : int; sizes : sizes }
      (** free the oldest of [live] blocks, allocate a new one *)
  | Frag of { holes : int; cached : bool }
      (** [holes] free 4-page runs between live 1-page blocks; alloc+free of
          1, 2, 3 pages (never an exact fit). Ours with [cached = false]
          runs with its per-process cache off (Shmpool.set_caching), so every
          pair searches the free runs as the original's does; with the cache
          on, the pair's own free is cached and the next alloc of that size
          takes it back without a search after warm-up. *)
  | Stats
  | Handoff of { sizes : sizes }
      (** worker 0 allocates, passes each block's address to worker 1
          through a shared ring; worker 1 frees it *)

type case = { name : string; kind : kind; workers : int }

(* How a case's figure reads. *)
type measure = Rate of string  (** ops/s, higher is better *) | Per_op  (** s per op *)

let measure_of c =
  match c.kind with
  | Ring _ -> Rate "pairs/s"
  | Handoff _ -> Rate "blocks/s"
  | Stats -> Rate "calls/s"
  | Frag _ -> Per_op

let worker_cases =
  let ring live sizes workers =
    let sz =
      match sizes with
      | Pages 1 -> "1 page"
      | Pages n -> Printf.sprintf "%d pages" n
      | Mixed -> "mixed 1-64 pages"
      | Range (a, b) -> Printf.sprintf "%d-%d pages" a b
    in
    {
      name = Printf.sprintf "ring %d, %s, %d worker%s" live sz workers (if workers > 1 then "s" else "");
      kind = Ring { live; sizes };
      workers;
    }
  in
  List.concat_map
    (fun live ->
      List.concat_map (fun sizes -> [ ring live sizes 1; ring live sizes 2 ]) [ Pages 1; Pages 4; Mixed ])
    [ 64; 1024 ]
  @ [ ring 64 (Range (65, 256)) 1; ring 64 (Range (65, 256)) 2 ]
  @ [
      { name = "hand-off, 1 page, worker A allocates, B frees"; kind = Handoff { sizes = Pages 1 }; workers = 2 };
      { name = "hand-off, mixed 1-64 pages, A allocates, B frees"; kind = Handoff { sizes = Mixed }; workers = 2 };
      {
        name = "fragmented (2000 free 4-page runs), 1-3 page pair, free-run search (ours uncached)";
        kind = Frag { holes = 2000; cached = false };
        workers = 1;
      };
      {
        name = "fragmented (2000 free 4-page runs), 1-3 page pair, ours cached after warm-up";
        kind = Frag { holes = 2000; cached = true };
        workers = 1;
      };
      { name = "stats"; kind = Stats; workers = 1 };
    ]
  |> List.filter (fun c -> selected c.name)

type create_case = { cname : string; bytes : int; really : bool; crounds : int }

let create_cases () =
  [
    { cname = "create_mempool 64 MiB"; bytes = 64 * mib; really = false; crounds = !rounds };
    { cname = "create_mempool 64 MiB, alloc_really"; bytes = 64 * mib; really = true; crounds = !rounds };
    { cname = "create_mempool 1 GiB"; bytes = 1024 * mib; really = false; crounds = !rounds };
    { cname = "create_mempool 1 GiB, alloc_really"; bytes = 1024 * mib; really = true; crounds = !create_rounds_big };
  ]
  |> List.filter (fun c -> selected c.cname)

(* The pools the workers use: large enough for 2 workers x 1024 live blocks
   of up to 64 pages, and for the original's cap of 64 + pages/4 blocks. *)
let pool_bytes = 1024 * mib

(* ----- deterministic sizes ---------------------------------------------- *)

let rec size_table sizes seed =
  let n = 4096 in
  match sizes with
  | Pages p -> Array.make n (p * page)
  | Mixed -> size_table (Range (1, 64)) seed
  | Range (a, b) ->
      (* xorshift64 *)
      let s = ref (Int64.of_int (seed * 2654435761 + 88172645463325252)) in
      Array.init n (fun _ ->
          let x = !s in
          let x = Int64.logxor x (Int64.shift_left x 13) in
          let x = Int64.logxor x (Int64.shift_right_logical x 7) in
          let x = Int64.logxor x (Int64.shift_left x 17) in
          s := x;
          (a + Int64.to_int (Int64.unsigned_rem x (Int64.of_int (b - a + 1)))) * page)

(* ----- start barrier ---------------------------------------------------- *)

(* A small file mapping shared by all processes (created by the master in
   the socket directory before startup): worker [slot] of run [gen] writes
   [gen] into its word and waits until all [n] words hold [gen]. *)
type barrier_mem = (int, Bigarray.int_elt, Bigarray.c_layout) Bigarray.Array1.t

let barrier_mem : barrier_mem option ref = ref None

(* The hand-off ring lives in the same mapping, after the barrier words:
   [ho_head] (written by worker 0 only), [ho_tail] (worker 1 only),
   [ho_done] the run whose producer has finished, then [ho_cap] addresses
   from [ho_slots]. Head and tail only grow; each run ends with
   tail = head. Each of the three words has a cache line of its own (64
   bytes; the mapping is page-aligned), and each worker reads the other's
   word only when the copy it read last says the ring is full (producer)
   or empty (consumer), as single-producer single-consumer rings do (and
   the Rust core bench's): reading it at every step cost a cache miss per
   block on each side, and that traffic, not the pools, set the pace of
   the faster implementation (both implementations go through the same
   ring). For the same reason the ring moves in whole cache lines of
   slots ([ho_line] of them; [ho_slots] starts a line) while the run
   lasts: the producer publishes [ho_head] once a line is full (and
   wherever it stopped at the end of the run), so the consumer sees whole
   lines only.
   With a slot at a time, a consumer right behind the producer read the
   line the producer was filling and re-read [ho_head] after every
   address, so that each address the producer wrote, and each [ho_head],
   first had to take a line back from the consumer's core: measured with
   main's pool (1 page), 6.1-6.7 M blocks/s by single slots, 7.7-7.9 M by
   lines; OCamlnet within its own noise either way (docs/experiments/
   handoff, fourth round). *)
let ho_line = 8
let ho_head = 64
let ho_tail = ho_head + 8
let ho_done = ho_head + 16
let ho_slots = ho_head + 24
let ho_cap = 1024

let barrier ~gen ~slot ~n =
  match !barrier_mem with
  | None -> failwith "no barrier"
  | Some b ->
      b.{slot} <- gen;
      let t0 = now () in
      let rec all i = i >= n || (b.{i} = gen && all (i + 1)) in
      while not (all 0) do
        if now () -. t0 > 30. then failwith "barrier timeout";
        Unix.sleepf 0.0001
      done

(* ----- the workloads, written once -------------------------------------- *)

(* (voluntary, involuntary) context switches of this process so far. *)
let ctx_switches () =
  let ic = open_in "/proc/self/status" in
  let v = ref 0 and n = ref 0 in
  (try
     while true do
       let l = input_line ic in
       match String.split_on_char ':' l with
       | [ "voluntary_ctxt_switches"; x ] -> v := int_of_string (String.trim x)
       | [ "nonvoluntary_ctxt_switches"; x ] -> n := int_of_string (String.trim x)
       | _ -> ()
     done
   with End_of_file -> ());
  close_in ic;
  (!v, !n)

type run = { pool : Netmcore.res_id; kind : kind; slot : int; n : int; gen : int; dur : float }

(* What one worker measured: steps, seconds, and the involuntary context
   switches it suffered meanwhile (preempted by another runnable process:
   the machine was busy). *)
type sample = { ops : int; secs : float; invol : int }

module Work (M : MEMPOOL) = struct
  (* Runs [step] in batches of [batch] from the barrier until [dur] has
     passed. *)
  let timed r ~batch step =
    barrier ~gen:r.gen ~slot:r.slot ~n:r.n;
    let v0, iv0 = ctx_switches () in
    let t0 = now () in
    let stop = t0 +. r.dur in
    let ops = ref 0 and t = ref t0 in
    while !t < stop do
      for _ = 1 to batch do
        step ()
      done;
      ops := !ops + batch;
      t := now ()
    done;
    let v1, iv1 = ctx_switches () in
    if Sys.getenv_opt "BENCH_TRACE" <> None then
      Printf.eprintf "    worker %d gen %d: %.6f .. %.6f, %d ops, %d voluntary %d involuntary switches\n%!" r.slot
        r.gen t0 !t !ops (v1 - v0) (iv1 - iv0);
    { ops = !ops; secs = !t -. t0; invol = iv1 - iv0 }

  let ring r ~live ~sizes =
    let tbl = size_table sizes (r.slot + 1) in
    let mask = Array.length tbl - 1 in
    let blocks = Array.init live (fun i -> M.alloc_mem r.pool tbl.(i land mask)) in
    let k = ref live in
    let step () =
      let i = !k land (live - 1) in
      M.free_mem r.pool blocks.(i);
      blocks.(i) <- M.alloc_mem r.pool tbl.(!k land mask);
      incr k
    in
    for _ = 1 to 4 * live do
      step ()
    done;
    let res = timed r ~batch:64 step in
    Array.iter (M.free_mem r.pool) blocks;
    res

  let frag r ~holes =
    let hole = Array.make holes (Bigarray.Array1.create Bigarray.char Bigarray.c_layout 1) in
    let keep = Array.copy hole in
    for i = 0 to holes - 1 do
      hole.(i) <- M.alloc_mem r.pool (4 * page);
      keep.(i) <- M.alloc_mem r.pool page
    done;
    Array.iter (M.free_mem r.pool) hole;
    let k = ref 0 in
    let step () =
      let m = M.alloc_mem r.pool ((1 + (!k mod 3)) * page) in
      M.free_mem r.pool m;
      incr k
    in
    for _ = 1 to 30 do
      step ()
    done;
    let res = timed r ~batch:3 step in
    Array.iter (M.free_mem r.pool) keep;
    res

  let stats r =
    for _ = 1 to 1000 do
      ignore (Sys.opaque_identity (M.stats r.pool))
    done;
    timed r ~batch:256 (fun () -> ignore (Sys.opaque_identity (M.stats r.pool)))

  (* Worker 0 allocates and posts each block's address; worker 1 takes and
     frees it (an address is grabbed as a memory value of the block's size,
     which both implementations free by its address). Worker 0's count is
     the figure (worker 1 reports 0 ops), so the sum is blocks handed off. *)
  let handoff r ~sizes =
    let b = Option.get !barrier_mem in
    let tbl = size_table sizes 7 in
    let mask = Array.length tbl - 1 in
    if r.slot = 0 then begin
      let k = ref b.{ho_head} in
      let k0 = !k in
      let tail = ref b.{ho_tail} in
      let step () =
        if !k - !tail >= ho_cap then tail := b.{ho_tail};
        if !k - !tail < ho_cap then begin
          let m = M.alloc_mem r.pool tbl.(!k land mask) in
          b.{ho_slots + (!k land (ho_cap - 1))} <- Nativeint.to_int (Netsys_mem.memory_address m);
          incr k;
          if !k land (ho_line - 1) = 0 then b.{ho_head} <- !k
        end
      in
      let res = timed r ~batch:64 step in
      b.{ho_head} <- !k;
      b.{ho_done} <- r.gen;
      { res with ops = !k - k0 }
    end
    else begin
      let k = ref b.{ho_tail} in
      let head = ref b.{ho_head} in
      let step () =
        if !k >= !head then head := b.{ho_head};
        if !k < !head then begin
          let a = b.{ho_slots + (!k land (ho_cap - 1))} in
          M.free_mem r.pool (Netsys_mem.grab (Nativeint.of_int a) tbl.(!k land mask));
          incr k;
          b.{ho_tail} <- !k
        end
      in
      let res = timed r ~batch:64 step in
      while b.{ho_done} <> r.gen || !k < b.{ho_head} do
        step ()
      done;
      { res with ops = 0 }
    end

  let run r =
    match r.kind with
    | Ring { live; sizes } -> ring r ~live ~sizes
    | Handoff { sizes } -> handoff r ~sizes
    | Frag { holes; _ } -> frag r ~holes
    | Stats -> stats r
end

module W_orig = Work (Orig)
module W_ours = Work (Ours)

type impl = Orig_impl | Ours_impl

let worker (impl, r) : (sample, string) result =
  (* this worker process only: the case measures ours without its cache *)
  (match (impl, r.kind) with
   | Ours_impl, Frag { cached = false; _ } -> Shmpool.set_caching (Shmpool_netmcore.shmpool r.pool) false
   | _ -> ());
  try Ok (match impl with Orig_impl -> W_orig.run r | Ours_impl -> W_ours.run r)
  with e -> Error (Printexc.to_string e)

let worker_fork, worker_join = Netmcore_process.def_process worker

(* ----- the coordinator (the first process) ------------------------------ *)

type plan = {
  cases : case list;
  orig_pool : Netmcore.res_id;
  ours_pool : Netmcore.res_id;
  nrounds : int;
  dur : float;
  impls : impl list;
}

(* per case: per impl: figures of the rounds (ops/s or s/op), errors;
   and the number of measurements kept although disturbed *)
type outcome = (string * (impl * float list * string list) list * int) list

(* A measurement during which a worker was preempted more than this many
   times per second is repeated (up to [attempts] times in all); the least
   disturbed attempt is kept. A worker alone on a CPU sees ~25/s. *)
let invol_per_sec = 60.
let attempts = 3

(* (busy, total) jiffies of all CPUs so far. *)
let cpu_jiffies () =
  let ic = open_in "/proc/stat" in
  let l = input_line ic in
  close_in ic;
  match List.filter (( <> ) "") (String.split_on_char ' ' l) with
  | "cpu" :: f ->
      let f = List.map int_of_string f in
      let total = List.fold_left ( + ) 0 f in
      let idle = List.nth f 3 + List.nth f 4 in
      (total - idle, total)
  | _ -> (0, 1)

(* The machine may be shared (two CPUs here): before a measurement, wait
   until other processes use less than a third of a CPU, within a total
   budget for the whole run. *)
let quiet_budget = ref 120.
let quiet_waited = ref 0.

let wait_quiet () =
  let busy_share () =
    let b0, t0 = cpu_jiffies () in
    Unix.sleepf 0.05;
    let b1, t1 = cpu_jiffies () in
    if t1 = t0 then 0. else float (b1 - b0) /. float (t1 - t0)
  in
  let ncpu =
    let ic = open_in "/proc/stat" in
    let n = ref 0 in
    (try
       while true do
         let l = input_line ic in
         if String.length l > 3 && String.sub l 0 3 = "cpu" && l.[3] <> ' ' then incr n
       done
     with End_of_file -> ());
    close_in ic;
    float (max 1 !n)
  in
  let start = now () in
  while !quiet_waited +. (now () -. start) < !quiet_budget && busy_share () *. ncpu > 0.33 do
    Unix.sleepf 0.1
  done;
  quiet_waited := !quiet_waited +. (now () -. start)

let coordinator (p : plan) : outcome * float =
  let gen = ref 0 in
  let limit = max 5 (int_of_float (invol_per_sec *. p.dur)) in
  let results =
    List.map
      (fun c ->
        let t0 = now () in
        let acc = Hashtbl.create 2 in
        let disturbed = ref 0 and retries = ref 0 in
        let measure impl =
          wait_quiet ();
          incr gen;
          let pool = match impl with Orig_impl -> p.orig_pool | Ours_impl -> p.ours_pool in
          let pids =
            List.init c.workers (fun slot ->
                Netmcore_process.start ~inherit_resources:`All worker_fork
                  (impl, { pool; kind = c.kind; slot; n = c.workers; gen = !gen; dur = p.dur }))
          in
          let rs = List.map (fun pid -> Netmcore_process.join worker_join pid) pids in
          if List.for_all (function Some (Ok _) -> true | _ -> false) rs then
            let ok = List.filter_map (function Some (Ok x) -> Some x | _ -> None) rs in
            let v =
              match measure_of c with
              | Rate _ -> List.fold_left (fun s x -> s +. (float x.ops /. x.secs)) 0. ok
              | Per_op ->
                  let x = List.hd ok in
                  x.secs /. float x.ops
            in
            Ok (v, List.fold_left (fun m x -> max m x.invol) 0 ok)
          else
            Error
              (List.filter_map
                 (function Some (Error e) -> Some e | None -> Some "worker died" | Some (Ok _) -> None)
                 rs)
        in
        for _round = 1 to p.nrounds do
          List.iter
            (fun impl ->
              let rec go n best =
                match measure impl with
                | Error e -> Error e
                | Ok (v, iv) ->
                    let best = match best with Some (_, biv) when biv <= iv -> best | _ -> Some (v, iv) in
                    if iv > limit && n < attempts then (incr retries; go (n + 1) best)
                    else Ok (Option.get best)
              in
              let figs, errs = try Hashtbl.find acc impl with Not_found -> ([], []) in
              let entry =
                match go 1 None with
                | Ok (v, iv) ->
                    if iv > limit then incr disturbed;
                    (v :: figs, errs)
                | Error e -> (figs, e @ errs)
              in
              Hashtbl.replace acc impl entry)
            p.impls
        done;
        Printf.eprintf "  %-52s %5.1f s (%d repeated, %d kept disturbed; %.1f s waited for quiet so far)\n%!"
          c.name (now () -. t0) !retries !disturbed !quiet_waited;
        ( c.name,
          List.map
            (fun impl ->
              let figs, errs = try Hashtbl.find acc impl with Not_found -> ([], []) in
              (impl, List.rev figs, List.sort_uniq compare errs))
            [ Orig_impl; Ours_impl ],
          !disturbed ))
      p.cases
  in
  (* (a tuple's components are evaluated right to left: read the wait after) *)
  (results, !quiet_waited)

let coord_fork, coord_join = Netmcore_process.def_process coordinator

(* ----- create_mempool, timed in the master ------------------------------ *)

(* Creates, times, unlinks and unmaps (so that the 1 GiB pools written by
   alloc_really give their memory back at once). *)
module Create (M : MEMPOOL) = struct
  let once ~bytes ~really =
    wait_quiet ();
    let t0 = now () in
    let id = M.create_mempool ~alloc_really:really bytes in
    let t = now () -. t0 in
    log_shm (M.shm_name id);
    if Sys.getenv_opt "BENCH_TRACE" <> None then
      Printf.eprintf "    create %d MiB%s: %.6f s\n%!" (bytes / mib) (if really then ", alloc_really" else "") t;
    M.unlink_mempool id;
    (match (Netmcore.get_resource id)#repr with
    | `Posix_shm_preallocated_sc (_, mem, _) -> Netsys_mem.memory_unmap_file mem
    | _ -> ());
    t
end

module C_orig = Create (Orig)
module C_ours = Create (Ours)

let create_bench () =
  List.map
    (fun c ->
      let t0 = now () in
      let o = ref [] and u = ref [] in
      for _ = 1 to c.crounds do
        o := C_orig.once ~bytes:c.bytes ~really:c.really :: !o;
        u := C_ours.once ~bytes:c.bytes ~really:c.really :: !u
      done;
      Printf.eprintf "  %-52s %5.1f s\n%!" c.cname (now () -. t0);
      (c.cname, [ (Orig_impl, List.rev !o, []); (Ours_impl, List.rev !u, []) ], 0))
    (create_cases ())

(* ----- the table -------------------------------------------------------- *)

let median l =
  let a = Array.of_list l in
  Array.sort compare a;
  let n = Array.length a in
  if n mod 2 = 1 then a.(n / 2) else (a.((n / 2) - 1) +. a.(n / 2)) /. 2.

let lo l = List.fold_left min infinity l
let hi l = List.fold_left max neg_infinity l

let fmt_rate v =
  if v >= 1e6 then Printf.sprintf "%.3g M" (v /. 1e6)
  else if v >= 1e3 then Printf.sprintf "%.3g k" (v /. 1e3)
  else Printf.sprintf "%.3g" v

let fmt_time v =
  if v >= 1. then Printf.sprintf "%.3g s" v
  else if v >= 1e-3 then Printf.sprintf "%.3g ms" (v *. 1e3)
  else if v >= 1e-6 then Printf.sprintf "%.3g µs" (v *. 1e6)
  else Printf.sprintf "%.3g ns" (v *. 1e9)

type row = {
  rname : string;
  unit_ : string;
  orig : float list;
  ours : float list;
  errors : string list;
  speedup : float;
  disturbed : int;
}

let rows_of ~measure results =
  List.map
    (fun (name, per_impl, disturbed) ->
      let get i = List.find (fun (j, _, _) -> j = i) per_impl in
      let _, o, eo = get Orig_impl and _, u, eu = get Ours_impl in
      let unit_ = match measure name with Rate u -> u | Per_op -> "time per op" in
      let speedup =
        if o = [] || u = [] then nan
        else match measure name with Rate _ -> median u /. median o | Per_op -> median o /. median u
      in
      {
        rname = name;
        unit_;
        orig = o;
        ours = u;
        errors = List.map (fun e -> "original: " ^ e) eo @ List.map (fun e -> "ours: " ^ e) eu;
        speedup;
        disturbed;
      })
    results

let cell ~measure l =
  if l = [] then "—"
  else
    let f = match measure with Rate _ -> fmt_rate | Per_op -> fmt_time in
    Printf.sprintf "%s (%s – %s)" (f (median l)) (f (lo l)) (f (hi l))

(* ----- goals ------------------------------------------------------------ *)

let find rows name = List.find_opt (fun r -> r.rname = name) rows

(* The speed-up each row must reach (0: no goal), for the picture. *)
let goal_of name =
  if contains name "hand-off" then 25.
  else if contains name "ring " && contains name ", 1 worker" then 10.
  else if contains name "ring " && contains name ", 2 workers" then 25.
  else if contains name "fragmented" then 50.
  else if contains name "1 GiB, alloc_really" then 10.
  else 0.

let goals rows =
  let ring_rows w = List.filter (fun r -> contains r.rname "ring " && contains r.rname (Printf.sprintf ", %d worker" w)) rows in
  let all_ge rs x =
    ( rs <> [] && List.for_all (fun r -> r.speedup >= x) rs,
      if rs = [] then "not run" else String.concat ", " (List.map (fun r -> Printf.sprintf "%.1f×" r.speedup) rs) )
  in
  let g1 = all_ge (ring_rows 1) 10. in
  let g2 = all_ge (ring_rows 2) 25. in
  let g2b =
    let pairs =
      List.filter_map
        (fun r2 ->
          let n1 = Str.global_replace (Str.regexp_string ", 2 workers") ", 1 worker" r2.rname in
          match find rows n1 with
          | Some r1 when r1.ours <> [] && r2.ours <> [] -> Some (median r2.ours /. median r1.ours)
          | _ -> None)
        (ring_rows 2)
    in
    ( pairs <> [] && List.for_all (fun x -> x >= 1.) pairs,
      if pairs = [] then "not run" else String.concat ", " (List.map (Printf.sprintf "%.2f") pairs) )
  in
  let one name x =
    match List.find_opt (fun r -> contains r.rname name) rows with
    | Some r -> (r.speedup >= x, Printf.sprintf "%.1f×" r.speedup)
    | None -> (false, "not run")
  in
  [
    ("1 worker ≥ 10× (every ring case)", g1);
    ("2 workers ≥ 25× (every ring case)", g2);
    ("ours: 2 workers ≥ 1 worker (aggregate ratio 2w/1w)", g2b);
    ("hand-off ≥ 25× (1 page; mixed 1-64)", all_ge (List.filter (fun r -> contains r.rname "hand-off") rows) 25.);
    ( "ours: 65-256 pages, 2 workers ≥ 1.6× 1 worker",
      match (find rows "ring 64, 65-256 pages, 1 worker", find rows "ring 64, 65-256 pages, 2 workers") with
      | Some r1, Some r2 when r1.ours <> [] && r2.ours <> [] ->
          let x = median r2.ours /. median r1.ours in
          (x >= 1.6, Printf.sprintf "%.2f" x)
      | _ -> (false, "not run") );
    ("fragmented ≥ 50× (free-run search, ours uncached)", one "free-run search" 50.);
    ("create 1 GiB alloc_really ≥ 10×", one "1 GiB, alloc_really" 10.);
  ]

(* ----- main (the master) ------------------------------------------------ *)

let () =
  let t_start = now () in
  let sockdir =
    if !sockdir_opt <> "" then (Unix.mkdir !sockdir_opt 0o700; !sockdir_opt)
    else
      let f = Filename.temp_file "shmpool-bench-" "" in
      Sys.remove f;
      Unix.mkdir f 0o700;
      f
  in
  let pools = ref [] in
  (* at_exit handlers also run in every forked worker when it exits: only
     the master may clean up. *)
  let master = Unix.getpid () in
  let cleanup () =
    if Unix.getpid () = master then begin
      List.iter (fun f -> try f () with _ -> ()) !pools;
      pools := [];
      ignore (Sys.command ("rm -rf " ^ Filename.quote sockdir))
    end
  in
  at_exit cleanup;
  (* the start barrier *)
  let bfile = Filename.concat sockdir "barrier" in
  let fd = Unix.openfile bfile [ Unix.O_RDWR; Unix.O_CREAT ] 0o600 in
  barrier_mem :=
    Some (Bigarray.array1_of_genarray (Unix.map_file fd Bigarray.int Bigarray.c_layout true [| ho_slots + ho_cap |]));
  Unix.close fd;
  Bigarray.Array1.fill (Option.get !barrier_mem) 0;
  Printf.eprintf "bench: %d rounds per implementation, %.2f s per measurement\n%!" !rounds !secs;
  (* create_mempool first, in the master before startup, as users do *)
  let created = create_bench () in
  let orig_pool = Orig.create_mempool pool_bytes in
  log_shm (Orig.shm_name orig_pool);
  pools := (fun () -> Orig.unlink_mempool orig_pool) :: !pools;
  let ours_pool = Ours.create_mempool pool_bytes in
  log_shm (Ours.shm_name ours_pool);
  pools := (fun () -> Ours.unlink_mempool ours_pool) :: !pools;
  let cases = worker_cases in
  let outcome =
    if cases = [] then Some ([], 0.)
    else
      Netmcore.run ~socket_directory:sockdir
        ~first_process:(fun () ->
          Netmcore_process.start ~inherit_resources:`All coord_fork
            {
              cases;
              orig_pool;
              ours_pool;
              nrounds = !rounds;
              dur = !secs;
              impls =
                (match !impls with "orig" -> [ Orig_impl ] | "ours" -> [ Ours_impl ] | _ -> [ Orig_impl; Ours_impl ]);
            })
        ~extract_result:(fun _ pid -> Netmcore_process.join_nowait coord_join pid)
        ()
  in
  cleanup ();
  let outcome, waited = match outcome with Some o -> o | None -> failwith "the coordinator returned nothing" in
  let measure_w name = measure_of (List.find (fun c -> c.name = name) cases) in
  let rows = rows_of ~measure:measure_w outcome @ rows_of ~measure:(fun _ -> Per_op) created in
  let measure_r r = if List.exists (fun c -> c.name = r.rname) cases then measure_w r.rname else Per_op in
  let b = Buffer.create 4096 in
  let pr fmt = Printf.bprintf b fmt in
  pr "| case | unit | original: median (min – max) | ours: median (min – max) | speed-up × |\n";
  pr "|---|---|---|---|---:|\n";
  List.iter
    (fun r ->
      let m = measure_r r in
      pr "| %s | %s | %s | %s | %s |\n" r.rname r.unit_ (cell ~measure:m r.orig) (cell ~measure:m r.ours)
        (if Float.is_nan r.speedup then "—" else Printf.sprintf "**%.1f**" r.speedup))
    rows;
  pr "\n";
  pr "Rounds: %d per implementation (create 1 GiB alloc_really: %d), alternating original, ours; %.2f s per \
      measurement; 2-worker figures are the sum of both workers' rates over the same window. \
      Speed-up = ours/original for rates, original/ours for times.\n\n"
    !rounds !create_rounds_big !secs;
  pr "Before each worker measurement the bench waits until other processes use less than a third of a CPU \
      (%.0f s waited in all, budget %.0f s). A measurement during which a worker was preempted more than %.0f \
      times/s (the machine was busy with other processes) is repeated, up to %d attempts, keeping the least \
      disturbed one."
    waited !quiet_budget invol_per_sec attempts;
  (match List.filter (fun r -> r.disturbed > 0) rows with
  | [] -> pr " None had to be kept disturbed.\n\n"
  | l ->
      pr " Kept although disturbed: %s.\n\n"
        (String.concat "; " (List.map (fun r -> Printf.sprintf "%s: %d of %d" r.rname r.disturbed (2 * !rounds)) l)));
  (match List.find_opt (fun r -> contains r.rname "1 GiB, alloc_really") rows with
  | Some r ->
      let l v = String.concat ", " (List.map fmt_time v) in
      (match (r.orig, r.ours) with
      | o :: _, u :: _ ->
          pr "create_mempool 1 GiB, alloc_really, first round (the least shmem held): original %s, ours %s               (%.1f×); median: %.1f×.\n\n"
            (fmt_time o) (fmt_time u) (o /. u) r.speedup
      | _ -> ());
      pr "create_mempool 1 GiB, alloc_really, round by round: original %s; ours %s. The original writes one \
          byte per page with lseek+write and never releases a pool's memory before the process exits (it \
          keeps a second mapping of the object), so each of its rounds runs with 1 GiB more shmem held; \
          ours uses posix_fallocate and its memory goes at unlink.\n\n"
        (l r.orig) (l r.ours)
  | None -> ());
  List.iter
    (fun r -> List.iter (fun e -> pr "- error in %s: %s\n" r.rname e) r.errors)
    rows;
  pr "\n## Goals\n\n";
  let gs = goals rows in
  List.iter (fun (g, (ok, detail)) -> pr "- **%s** %s: %s\n" (if ok then "PASS" else "MISS") g detail) gs;
  let oc = open_out !out_md in
  Buffer.output_buffer oc b;
  close_out oc;
  let oc = open_out !out_dat in
  Printf.fprintf oc "# case speed-up goal (0: none)\n";
  List.iter
    (fun r ->
      if not (Float.is_nan r.speedup) then
        Printf.fprintf oc "\"%s\" %g %g\n" (String.map (function '"' -> '\'' | c -> c) r.rname) r.speedup
          (goal_of r.rname))
    rows;
  close_out oc;
  print_string (Buffer.contents b);
  Printf.eprintf "bench: %.0f s\n%!" (now () -. t_start)
