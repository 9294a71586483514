open Bigarray
module P = Shmpool

let ps = P.page_size
let check_clean pool = Alcotest.(check (list string)) "check clean" [] (P.check pool)

let stats_unchanged pool f =
  let before = P.stats pool and dbg = P.debug_info pool in
  f ();
  Alcotest.(check bool) "stats unchanged" true (P.stats pool = before);
  Alcotest.(check string) "debug_info unchanged" dbg (P.debug_info pool);
  check_clean pool

let test_basic () =
  let pool = P.create (64 * ps) in
  let s = P.stats pool in
  Alcotest.(check int) "payload" (64 * ps) s.payload;
  Alcotest.(check int) "free" (64 * ps) s.free;
  Alcotest.(check int) "largest" (64 * ps) s.largest_free;
  Alcotest.(check bool) "total incl header" true (s.total > s.payload);
  let m = P.alloc pool 1 in
  Alcotest.(check int) "rounded" ps (Array1.dim m);
  Alcotest.(check int) "aligned" 0 (Nativeint.to_int (Nativeint.rem (P.addr_of m) (Nativeint.of_int ps)));
  Alcotest.(check int) "size" ps (P.size pool m);
  Alcotest.(check int) "size_at_addr" ps (P.size_at_addr pool (P.addr_of m));
  let m2 = P.alloc pool (3 * ps + 1) in
  Alcotest.(check int) "4 pages" (4 * ps) (Array1.dim m2);
  Array1.fill m2 'x';
  Alcotest.(check int) "free after" (59 * ps) (P.stats pool).free;
  Alcotest.(check int) "live" 2 (P.stats pool).live_blocks;
  P.free pool m;
  P.free pool (Array1.sub m2 0 1);
  Alcotest.(check int) "all free" (64 * ps) (P.stats pool).free;
  Alcotest.(check int) "coalesced" (64 * ps) (P.stats pool).largest_free;
  check_clean pool;
  P.close pool

let test_bad_input () =
  let pool = P.create (16 * ps) and other = P.create (4 * ps) in
  let m = P.alloc pool (2 * ps) in
  let o = P.alloc other ps in
  stats_unchanged pool (fun () ->
      Alcotest.check_raises "size 0" (Invalid_argument "Shmpool.alloc: bad size") (fun () ->
          ignore (P.alloc pool 0));
      Alcotest.check_raises "size -1" (Invalid_argument "Shmpool.alloc: bad size") (fun () ->
          ignore (P.alloc pool (-1)));
      Alcotest.check_raises "max_int" P.Out_of_pool_memory (fun () -> ignore (P.alloc pool max_int));
      Alcotest.check_raises "too big" P.Out_of_pool_memory (fun () ->
          ignore (P.alloc pool (15 * ps)));
      let bad = Invalid_argument "Shmpool.free: not the start of a live block" in
      Alcotest.check_raises "interior" bad (fun () -> P.free pool (Array1.sub m ps ps));
      Alcotest.check_raises "interior byte" bad (fun () -> P.free pool (Array1.sub m 1 1));
      Alcotest.check_raises "foreign" bad (fun () -> P.free pool (Array1.create char c_layout 10));
      Alcotest.check_raises "other pool" bad (fun () -> P.free pool o);
      Alcotest.check_raises "size interior" Not_found (fun () -> ignore (P.size pool (Array1.sub m ps 1)));
      Alcotest.check_raises "size foreign" Not_found (fun () ->
          ignore (P.size pool (Array1.create char c_layout 10)));
      Alcotest.check_raises "size_at_addr 0" Not_found (fun () -> ignore (P.size_at_addr pool 0n)));
  P.free pool m;
  stats_unchanged pool (fun () ->
      Alcotest.check_raises "double free" (Invalid_argument "Shmpool.free: not the start of a live block")
        (fun () -> P.free pool m));
  Alcotest.check_raises "create 0" (Invalid_argument "Shmpool.create: bad size") (fun () ->
      ignore (P.create 0));
  P.close pool;
  P.close other

let test_fill_one_page_blocks () =
  let n = 1000 in
  let pool = P.create (n * ps) in
  let blocks = Array.init n (fun i -> let m = P.alloc pool 1 in m.{0} <- Char.chr (i land 255); m) in
  Alcotest.(check int) "full" 0 (P.stats pool).free;
  Alcotest.check_raises "then OOM" P.Out_of_pool_memory (fun () -> ignore (P.alloc pool 1));
  Array.iteri (fun i m -> Alcotest.(check char) "stamp" (Char.chr (i land 255)) m.{0}) blocks;
  check_clean pool;
  Array.iteri (fun i m -> if i mod 2 = 0 then P.free pool m) blocks;
  Array.iteri (fun i m -> if i mod 2 = 1 then P.free pool m) blocks;
  Alcotest.(check int) "empty" (n * ps) (P.stats pool).largest_free;
  check_clean pool;
  P.close pool

let test_tiny_pools () =
  List.iter
    (fun pages ->
      let pool = P.create (pages * ps) in
      let ms = List.init pages (fun _ -> P.alloc pool ps) in
      List.iter (fun m -> Array1.fill m 'z') ms;
      Alcotest.check_raises "full" P.Out_of_pool_memory (fun () -> ignore (P.alloc pool 1));
      List.iter (P.free pool) ms;
      let m = P.alloc pool (pages * ps) in
      Alcotest.(check int) "whole pool" (pages * ps) (Array1.dim m);
      check_clean pool;
      P.close pool)
    [ 1; 2 ]

let test_fork_shared () =
  let pool = P.create (256 * ps) in
  let mailbox = P.alloc pool ps in
  let nchildren = 4 in
  let pids =
    List.init nchildren (fun i ->
        Testutil.fork (fun () ->
            let mine = List.init 10 (fun _ -> P.alloc pool (2 * ps)) in
            List.iter (fun m -> Array1.fill m (Char.chr (65 + i))) mine;
            (* publish the address of the first block in the mailbox *)
            let a = P.addr_of (List.hd mine) in
            for b = 0 to 7 do
              mailbox.{(i * 8) + b} <- Char.chr (Int64.to_int (Int64.logand (Int64.shift_right_logical (Int64.of_nativeint a) (8 * b)) 255L))
            done;
            Unix.sleepf 0.05;
            List.iter
              (fun m ->
                for k = 0 to Array1.dim m - 1 do
                  if m.{k} <> Char.chr (65 + i) then failwith "stamp overwritten"
                done)
              mine;
            List.iter (P.free pool) (List.tl mine)))
  in
  List.iter Testutil.wait_ok pids;
  (* the parent frees the blocks the children left, found by address *)
  for i = 0 to nchildren - 1 do
    let a = ref 0L in
    for b = 7 downto 0 do
      a := Int64.logor (Int64.shift_left !a 8) (Int64.of_int (Char.code mailbox.{(i * 8) + b}))
    done;
    Alcotest.(check int) "child block size" (2 * ps) (P.size_at_addr pool (Int64.to_nativeint !a))
  done;
  Alcotest.(check int) "live" (1 + nchildren) (P.stats pool).live_blocks;
  let owners = P.owners pool in
  Alcotest.(check int) "owners: parent + children" (1 + nchildren) (List.length owners);
  let r = P.reclaim_dead pool in
  Alcotest.(check int) "reclaimed blocks" nchildren r.blocks_freed;
  Alcotest.(check int) "reclaimed pages" (2 * nchildren) r.pages_freed;
  P.free pool mailbox;
  Alcotest.(check int) "all free" (256 * ps) (P.stats pool).free;
  check_clean pool;
  P.close pool

let test_named_attach () =
  Testutil.with_name "shmpool" (fun name ->
      let pool = P.create ~name ~prefault:true (32 * ps) in
      Alcotest.(check (option string)) "name" (Some name) (P.name pool);
      Alcotest.(check bool) "in /dev/shm" true (Sys.file_exists ("/dev/shm" ^ name));
      let pid =
        Testutil.fork (fun () ->
            let q = P.attach name in
            let m = P.alloc q (4 * ps) in
            Array1.fill m 'q';
            P.close q)
      in
      Testutil.wait_ok pid;
      Alcotest.(check int) "child's block visible" (28 * ps) (P.stats pool).free;
      Alcotest.check_raises "create twice fails" (Failure "Shmpool.create: shm_open: File exists")
        (fun () -> ignore (P.create ~name (4 * ps)));
      P.unlink pool;
      Alcotest.(check bool) "unlinked" false (Sys.file_exists ("/dev/shm" ^ name));
      (match P.attach name with
       | _ -> Alcotest.fail "attach after unlink"
       | exception Failure _ -> ());
      P.close pool);
  Testutil.with_name "shmpool" (fun name ->
      let fd = Unix.openfile ("/dev/shm" ^ name) [ Unix.O_CREAT; Unix.O_RDWR ] 0o600 in
      Unix.ftruncate fd 100000;
      Unix.close fd;
      match P.attach name with
      | _ -> Alcotest.fail "attached a non-pool"
      | exception P.Not_a_pool _ -> ())

let test_gc_compact () =
  let pool = P.create (64 * ps) in
  let ms = List.init 20 (fun i -> let m = P.alloc pool ps in Array1.fill m (Char.chr (97 + i)); m) in
  Gc.compact ();
  ignore (List.init 10000 (fun i -> String.make 10 (Char.chr (i land 127))));
  Gc.compact ();
  List.iteri (fun i m -> Alcotest.(check char) "kept" (Char.chr (97 + i)) m.{ps - 1}) ms;
  List.iter (P.free pool) ms;
  check_clean pool;
  P.close pool

let test_caching () =
  let pool = P.create (256 * ps) in
  let a = P.alloc pool ps and b = P.alloc pool ps in
  P.free pool a;
  (* cached: the same page comes back first *)
  let a' = P.alloc pool ps in
  Alcotest.(check bool) "reused from the cache" true (P.addr_of a = P.addr_of a');
  P.free pool a';
  P.set_caching pool false;
  let d = P.debug_info pool in
  Alcotest.(check bool) "turning it off gives the cache back" true
    (try ignore (Str.search_forward (Str.regexp_string "cached in processes (offs->bsize): {}") d 0); true
     with Not_found -> false);
  P.free pool b;
  Alcotest.(check int) "coalesced" (256 * ps) (P.stats pool).largest_free;
  P.flush_cache pool;
  check_clean pool;
  P.close pool

let test_in_place_keeps_its_memory () =
  (* a GC-managed mapping formatted as a pool must stay mapped while the
     pool is used, even when the caller drops it *)
  let file = Filename.temp_file "shmpool-inplace" ".bin" in
  Fun.protect ~finally:(fun () -> Sys.remove file) @@ fun () ->
  let fd = Unix.openfile file [ Unix.O_RDWR ] 0o600 in
  let pool =
    let m =
      Bigarray.array1_of_genarray
        (Unix.map_file fd Bigarray.char Bigarray.c_layout true [| 64 * ps |])
    in
    P.format_in_place m
  in
  Unix.close fd;
  Gc.full_major ();
  Gc.compact ();
  let b = P.alloc pool (2 * ps) in
  Bigarray.Array1.fill b 'k';
  Alcotest.(check char) "still mapped" 'k' b.{(2 * ps) - 1};
  P.free pool b;
  check_clean pool;
  P.close pool

let test_closed () =
  let pool = P.create ps in
  P.close pool;
  Alcotest.check_raises "closed" (Failure "Shmpool.alloc: pool is closed") (fun () -> ignore (P.alloc pool 1))

let () =
  Alcotest.run "shmpool"
    [
      ( "Shmpool",
        [
          Alcotest.test_case "alloc/free/size/stats" `Quick test_basic;
          Alcotest.test_case "bad input leaves the pool unchanged" `Quick test_bad_input;
          Alcotest.test_case "pool filled with 1-page blocks" `Quick test_fill_one_page_blocks;
          Alcotest.test_case "1- and 2-page pools" `Quick test_tiny_pools;
          Alcotest.test_case "fork: 4 children share, reclaim_dead" `Quick test_fork_shared;
          Alcotest.test_case "named pool, attach, unlink, not a pool" `Quick test_named_attach;
          Alcotest.test_case "Gc.compact with live blocks" `Quick test_gc_compact;
          Alcotest.test_case "per-process cache, set_caching" `Quick test_caching;
          Alcotest.test_case "format_in_place keeps its memory alive" `Quick
            test_in_place_keeps_its_memory;
          Alcotest.test_case "closed pool" `Quick test_closed;
        ] );
    ]
