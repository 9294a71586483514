(* A single-process variant of bench_heap.ml's "modify + add" cases, for
   profilers (perf record, valgrind --tool=callgrind): the master creates
   the pool and runs the loop itself, no Netmcore workers.

     prof_heap.exe IMPL KIND [N]

   IMPL: orig | ours; KIND: string10k | string8 | list10; N iterations (default
   200000). Prints ns per modify + add, wall-clock and CPU time (the
   latter less disturbed by other processes on a loaded machine). *)

module Ours = Shmpool_netmcore

let () =
  let impl = Sys.argv.(1) and kind = Sys.argv.(2) in
  let n = if Array.length Sys.argv > 3 then int_of_string Sys.argv.(3) else 200_000 in
  let v =
    match kind with
    | "string10k" -> Obj.repr (String.make 10_000 'x')
    | "list10" -> Obj.repr (List.init 10 Fun.id)
    | "string8" -> Obj.repr (String.make 8 'x')
    | _ -> failwith "KIND: string10k | string8 | list10"
  in
  let now = Unix.gettimeofday in
  let run create_mempool unlink create_heap modify add root destroy debug_info =
    let pool = create_mempool (256 * 1024 * 1024) in
    Fun.protect ~finally:(fun () -> unlink pool) @@ fun () ->
    let h = create_heap pool 65536 (ref (Obj.repr 0)) in
    for _ = 1 to 1000 do
      modify h (fun m -> (root h) := add m v)
    done;
    (* PROF_HEAP_TRACE: where the first 30 values land (KiB), to see how
       much memory the copies cycle through *)
    if Sys.getenv_opt "PROF_HEAP_TRACE" <> None then begin
      for _ = 1 to 30 do
        modify h (fun m -> (root h) := add m v);
        Printf.printf "%d " ((Obj.magic !(root h) : int) * 2 / 1024 mod 100000)
      done;
      print_newline ()
    end;
    let t0 = now () and c0 = Sys.time () in
    for _ = 1 to n do
      modify h (fun m -> (root h) := add m v)
    done;
    let t = now () -. t0 and c = Sys.time () -. c0 in
    if Sys.getenv_opt "PROF_HEAP_DEBUG" <> None then prerr_string (debug_info h);
    destroy h;
    Printf.printf "%s %s: %.1f ns per modify + add (CPU time: %.1f ns)\n" impl kind (t /. float n *. 1e9)
      (c /. float n *. 1e9)
  in
  match impl with
  | "orig" ->
      run Netmcore_mempool.create_mempool Netmcore_mempool.unlink_mempool Netmcore_heap.create_heap
        Netmcore_heap.modify Netmcore_heap.add Netmcore_heap.root Netmcore_heap.destroy
        (fun _ -> "")
  | "ours" ->
      run Ours.Netmcore_mempool.create_mempool Ours.Netmcore_mempool.unlink_mempool
        Ours.Netmcore_heap.create_heap Ours.Netmcore_heap.modify Ours.Netmcore_heap.add
        Ours.Netmcore_heap.root Ours.Netmcore_heap.destroy Ours.Netmcore_heap.debug_info
  | _ -> failwith "IMPL: orig | ours"
