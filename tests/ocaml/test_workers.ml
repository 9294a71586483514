(* The drop-in pool used as users use it: a pool created by the master
   before Netmcore.startup, workers started with ~inherit_resources that
   allocate, stamp, exchange addresses, verify and free each other's blocks;
   then a worker SIGKILLed in the middle of its alloc/free loop while the
   others go on, and a fresh worker after it. *)

module M = Shmpool_netmcore.Netmcore_mempool

let ps = Shmpool.page_size
let nworkers = 3
let rounds = 2000

(* mailbox layout (one page, allocated by the master): slot i (8 words of
   8 bytes): 0 = address of worker i's shared block, 1 = its size,
   2 = pid of the victim; word 64 = workers done with phase 1 *)
let get mb slot = Int64.to_int (Bytes.get_int64_le (let b = Bytes.create 8 in Netsys_mem.blit_memory_to_bytes mb (slot * 8) b 0 8; b) 0)

let set mb slot v =
  let b = Bytes.create 8 in
  Bytes.set_int64_le b 0 (Int64.of_int v);
  Netsys_mem.blit_bytes_to_memory b 0 mb (slot * 8) 8

let wait_until ?(timeout = 20.0) what f =
  let t0 = Unix.gettimeofday () in
  while not (f ()) do
    if Unix.gettimeofday () -. t0 > timeout then failwith ("timeout waiting for " ^ what);
    Unix.sleepf 0.001
  done

let fill m c = Bigarray.Array1.fill m c

let verify m c what =
  for k = 0 to Bigarray.Array1.dim m - 1 do
    if m.{k} <> c then failwith (Printf.sprintf "%s: byte %d is %C not %C" what k m.{k} c)
  done

(* A worker: churn, stamp, publish one block, verify and free a neighbour's. *)
let worker (pool, mb_addr, i, late) =
  try
    let mb = Netsys_mem.grab mb_addr ps in
    let stamp = Char.chr (65 + i) in
    let kept = ref [] in
    for r = 1 to rounds do
      let m = M.alloc_mem pool (((r * 7) + i) mod 5 * ps + 1) in
      fill m stamp;
      if r mod 50 = 0 then kept := m :: !kept else (verify m stamp "churn"; M.free_mem pool m)
    done;
    List.iter (fun m -> verify m stamp "kept") !kept;
    if late then (List.iter (M.free_mem pool) !kept; raise Exit);
    let shared = M.alloc_mem pool (3 * ps) in
    fill shared stamp;
    set mb (i * 8) (Nativeint.to_int (Netsys_mem.memory_address shared));
    set mb ((i * 8) + 1) (Bigarray.Array1.dim shared);
    set mb (64 + i) 1;
    wait_until "the others to publish" (fun () ->
        List.for_all (fun j -> get mb (64 + j) = 1) (List.init nworkers Fun.id));
    let j = (i + 1) mod nworkers in
    let addr = Nativeint.of_int (get mb (j * 8)) and len = get mb ((j * 8) + 1) in
    if M.size_mem_at_addr pool addr <> len then failwith "neighbour's size";
    let theirs = Netsys_mem.grab addr len in
    verify theirs (Char.chr (65 + j)) "neighbour's block";
    M.free_mem pool theirs;
    List.iter (M.free_mem pool) !kept;
    "ok"
  with
  | Exit -> "ok"
  | e -> Printexc.to_string e

let worker_fork, worker_join = Netmcore_process.def_process worker

(* The victim loops until killed, publishing its pid first. *)
let victim (pool, mb_addr) =
  let mb = Netsys_mem.grab mb_addr ps in
  let held = List.init 4 (fun _ -> M.alloc_mem pool (2 * ps)) in
  set mb 200 (Unix.getpid ());
  while true do
    let m = M.alloc_mem pool ps in
    fill m 'v';
    M.free_mem pool m
  done;
  List.length held

let victim_fork, victim_join = Netmcore_process.def_process victim

(* A worker that did not inherit the pool must get an error (as with the
   original: Netmcore refuses the resource), not a crash on its unmapped
   memory. *)
let outsider pool =
  match M.alloc_mem pool ps with
  | _ -> "allocated in a pool it did not inherit"
  | exception Failure msg -> "Failure: " ^ msg
  | exception e -> Printexc.to_string e

let outsider_fork, outsider_join = Netmcore_process.def_process outsider

type outcome = {
  results : string list;
  victim_result : int option;
  after : string;
  outsider_said : string;
}

let first (pool, mb_addr) =
  let start f arg = Netmcore_process.start ~inherit_resources:`All f arg in
  let v = start victim_fork (pool, mb_addr) in
  let ws = List.init nworkers (fun i -> start worker_fork (pool, mb_addr, i, false)) in
  let mb = Netsys_mem.grab mb_addr ps in
  wait_until "the victim's pid" (fun () -> get mb 200 <> 0);
  Unix.sleepf 0.05;
  Unix.kill (get mb 200) Sys.sigkill;
  let results =
    List.map (fun w -> match Netmcore_process.join worker_join w with Some r -> r | None -> "no result") ws
  in
  let victim_result = Netmcore_process.join victim_join v in
  (* a process started after the kill must find the pool usable *)
  let w = start worker_fork (pool, mb_addr, 0, true) in
  let after = match Netmcore_process.join worker_join w with Some r -> r | None -> "no result" in
  let o = Netmcore_process.start ~inherit_resources:(`Resources []) outsider_fork pool in
  let outsider_said =
    match Netmcore_process.join outsider_join o with Some r -> r | None -> "no result (crashed?)"
  in
  { results; victim_result; after; outsider_said }

let first_fork, first_join = Netmcore_process.def_process first

let () =
  let pool = M.create_mempool (4 * 1024 * 1024) in
  let sockdir = Filename.concat (Filename.get_temp_dir_name ()) (Printf.sprintf "shmpool-workers-%d" (Unix.getpid ())) in
  Unix.mkdir sockdir 0o700;
  (* at_exit also runs in every Netmcore worker (forked from here) when it
     exits: only the master may clean up. *)
  let master = Unix.getpid () in
  let cleanup () =
    if Unix.getpid () = master then begin
      (try M.unlink_mempool pool with _ -> ());
      ignore (Sys.command ("rm -rf " ^ Filename.quote sockdir))
    end
  in
  at_exit cleanup;
  let mb = M.alloc_mem pool ps in
  fill mb '\000';
  let mb_addr = Netsys_mem.memory_address mb in
  let outcome =
    Netmcore.run ~socket_directory:sockdir
      ~first_process:(fun () ->
        Netmcore_process.start ~inherit_resources:`All first_fork (pool, mb_addr))
      ~extract_result:(fun _ pid -> Netmcore_process.join_nowait first_join pid)
      ()
  in
  let sp = Shmpool_netmcore.shmpool pool in
  let before_reclaim = Shmpool.stats sp in
  let check_list = Shmpool.check sp in
  let r = Shmpool.reclaim_dead sp in
  M.free_mem pool mb;
  let _, free, contiguous = M.stats pool in
  let open Alcotest in
  run "shmpool.netmcore workers"
    [
      ( "Netmcore",
        [
          test_case "workers verified and freed each other's blocks" `Quick (fun () ->
              match outcome with
              | None -> fail "the first process returned nothing"
              | Some o ->
                  check (list string) "workers" (List.init nworkers (fun _ -> "ok")) o.results;
                  check bool "the victim returned nothing" true (o.victim_result = None);
                  check string "a worker started after the kill" "ok" o.after;
                  check bool
                    ("a worker without the pool gets Netmcore's error: " ^ o.outsider_said)
                    true
                    (String.length o.outsider_said > 9 && String.sub o.outsider_said 0 9 = "Failure: "));
          test_case "pool sound after the kill" `Quick (fun () -> check (list string) "check" [] check_list);
          test_case "victim held its 4 blocks (+ maybe 1)" `Quick (fun () ->
              check bool "reclaimed victim's blocks" true (r.blocks_freed = 4 || r.blocks_freed = 5);
              check bool "reclaimed its pages" true (r.pages_freed = 8 || r.pages_freed = 9);
              check int "one dead owner with blocks" 1 (List.length (List.filter (fun (_, p) -> p > 0) r.dead));
              check bool "the rest was freed by the workers" true
                (before_reclaim.live_blocks = r.blocks_freed + 1));
          test_case "everything back" `Quick (fun () ->
              check int "free" (4 * 1024 * 1024) free;
              check int "contiguous" free contiguous;
              check (list string) "check after reclaim" [] (Shmpool.check sp));
        ] );
    ]
