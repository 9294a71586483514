(* A single-process variant of bench.ml's ring workload, for profilers
   (perf record, valgrind --tool=callgrind): the master creates the pool and
   runs the loop itself, no Netmcore workers.

     prof.exe IMPL LIVE PAGES [PAIRS]

   IMPL: orig | ours; LIVE: live blocks in the ring; PAGES: block size in
   pages, or 0 for mixed 1-64 pages (the same sizes as bench.exe's). Prints
   ns per alloc+free pair. *)

module type MEMPOOL = module type of Netmcore_mempool

let page = Netsys_mem.pagesize

let sizes pages =
  if pages > 0 then Array.make 4096 (pages * page)
  else
    let s = ref (Int64.of_int ((1 * 2654435761) + 88172645463325252)) in
    Array.init 4096 (fun _ ->
        let x = !s in
        let x = Int64.logxor x (Int64.shift_left x 13) in
        let x = Int64.logxor x (Int64.shift_right_logical x 7) in
        let x = Int64.logxor x (Int64.shift_left x 17) in
        s := x;
        (1 + Int64.to_int (Int64.unsigned_rem x 64L)) * page)

module Ring (M : MEMPOOL) = struct
  let run ~live ~pages ~pairs =
    let pool = M.create_mempool (1024 * 1024 * 1024) in
    Fun.protect
      ~finally:(fun () -> M.unlink_mempool pool)
      (fun () ->
        let tbl = sizes pages in
        let blocks = Array.init live (fun i -> M.alloc_mem pool tbl.(i land 4095)) in
        let k = ref live in
        let step () =
          let i = !k mod live in
          M.free_mem pool blocks.(i);
          blocks.(i) <- M.alloc_mem pool tbl.(!k land 4095);
          incr k
        in
        for _ = 1 to 4 * live do
          step ()
        done;
        let t0 = Unix.gettimeofday () in
        for _ = 1 to pairs do
          step ()
        done;
        let t = Unix.gettimeofday () -. t0 in
        Array.iter (M.free_mem pool) blocks;
        t /. float pairs *. 1e9)
end

module R_orig = Ring (Netmcore_mempool)
module R_ours = Ring (Shmpool_netmcore.Netmcore_mempool)

let () =
  match Array.to_list Sys.argv |> List.tl with
  | impl :: live :: pages :: rest ->
      let live = int_of_string live and pages = int_of_string pages in
      let pairs = match rest with p :: _ -> int_of_string p | [] -> 1_000_000 in
      let ns =
        match impl with
        | "orig" -> R_orig.run ~live ~pages ~pairs
        | "ours" -> R_ours.run ~live ~pages ~pairs
        | _ -> invalid_arg "IMPL: orig | ours"
      in
      Printf.printf "%s ring %d, %s: %.1f ns per alloc+free pair\n" impl live
        (if pages = 0 then "mixed 1-64 pages" else Printf.sprintf "%d page(s)" pages)
        ns
  | _ ->
      prerr_endline "usage: prof.exe orig|ours LIVE PAGES(0 = mixed 1-64) [PAIRS]";
      exit 2
