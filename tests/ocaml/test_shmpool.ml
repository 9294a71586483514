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
  let closed fn = Failure (fn ^ ": pool is closed") in
  Alcotest.check_raises "alloc" (closed "Shmpool.alloc") (fun () -> ignore (P.alloc pool 1));
  Alcotest.check_raises "stats" (closed "Shmpool.stats") (fun () -> ignore (P.stats pool));
  Alcotest.check_raises "check" (closed "Shmpool.check") (fun () -> ignore (P.check pool));
  Alcotest.check_raises "debug_info" (closed "Shmpool.debug_info") (fun () ->
      ignore (P.debug_info pool));
  Alcotest.check_raises "owners" (closed "Shmpool.owners") (fun () -> ignore (P.owners pool));
  Alcotest.check_raises "reclaim_dead" (closed "Shmpool.reclaim_dead") (fun () ->
      ignore (P.reclaim_dead pool));
  Alcotest.check_raises "flush_cache" (closed "Shmpool.flush_cache") (fun () -> P.flush_cache pool);
  Alcotest.check_raises "unlink" (closed "Shmpool.unlink") (fun () -> P.unlink pool);
  P.close pool

(* ----- names are bytes; bad ones raise, 100 times in a row ----- *)

let bad_names =
  [ ""; "noslash"; "/"; "//a"; "/a/"; "/a/b"; "/a\000b"; "\000"; "/\000";
    "/" ^ String.make 255 'x'; String.make 300 '/'; "/\xff/\xfe" ]

let test_bad_names () =
  let pool = P.create (16 * ps) in
  let m = P.alloc pool ps in
  Array1.fill m 'm';
  let before = P.stats pool in
  let missing = Printf.sprintf "/shmpool-test-%d-missing-\xff\xfe" (Unix.getpid ()) in
  for _ = 1 to 100 do
    List.iter
      (fun n ->
        Alcotest.check_raises "attach" (Invalid_argument "Shmpool.attach: bad shm name")
          (fun () -> ignore (P.attach n));
        Alcotest.check_raises "create" (Invalid_argument "Shmpool.create: bad shm name")
          (fun () -> ignore (P.create ~name:n ps));
        Alcotest.check_raises "prefault_shm" (Invalid_argument "Shmpool.prefault_shm: bad shm name")
          (fun () -> P.prefault_shm n))
      bad_names;
    (* a fine name (not UTF-8) that nobody created *)
    Alcotest.check_raises "attach missing"
      (Failure "Shmpool.attach: shm_open: No such file or directory") (fun () ->
        ignore (P.attach missing))
  done;
  (* then normal work *)
  Alcotest.(check bool) "stats unchanged" true (P.stats pool = before);
  Alcotest.(check char) "block intact" 'm' m.{ps - 1};
  let m2 = P.alloc pool (2 * ps) in
  Array1.fill m2 'n';
  P.free pool m2;
  P.free pool m;
  check_clean pool;
  P.close pool

let test_byte_names () =
  (* any byte but '/' and NUL is fine after the slash, UTF-8 or not *)
  Testutil.with_name "shmpool-\xff\xc3(-\001" (fun name ->
      let pool = P.create ~name (4 * ps) in
      Alcotest.(check (option string)) "name" (Some name) (P.name pool);
      Alcotest.(check bool) "in /dev/shm" true (Sys.file_exists ("/dev/shm" ^ name));
      P.prefault_shm name;
      let q = P.attach name in
      Alcotest.(check (option string)) "attached name" (Some name) (P.name q);
      let m = P.alloc q ps in
      Alcotest.(check int) "seen by the creator" 1 (P.stats pool).live_blocks;
      P.free q m;
      check_clean q;
      P.close q;
      P.unlink pool;
      Alcotest.(check bool) "unlinked" false (Sys.file_exists ("/dev/shm" ^ name));
      P.close pool);
  (* the longest name: 254 bytes after the slash *)
  let base = Testutil.fresh_name "shmpool" in
  let longest = base ^ String.make (255 - String.length base) 'x' in
  Fun.protect ~finally:(fun () -> try Unix.unlink ("/dev/shm" ^ longest) with _ -> ()) @@ fun () ->
  Alcotest.check_raises "one more byte" (Invalid_argument "Shmpool.create: bad shm name") (fun () ->
      ignore (P.create ~name:(longest ^ "x") ps));
  let pool = P.create ~name:longest ps in
  Alcotest.(check bool) "longest name in /dev/shm" true (Sys.file_exists ("/dev/shm" ^ longest));
  P.unlink pool;
  P.close pool

(* ----- a block used after close never lands in another pool ----- *)

(* Whether the line of /proc/self/maps that covers [addr] mentions
   [what]. *)
let mapped_as what (addr : nativeint) =
  let ic = open_in "/proc/self/maps" in
  Fun.protect ~finally:(fun () -> close_in ic) @@ fun () ->
  let rec go () =
    match input_line ic with
    | exception End_of_file -> false
    | l ->
        let lo, hi = Scanf.sscanf l "%nx-%nx" (fun a b -> (a, b)) in
        if addr >= lo && addr < hi then
          (try ignore (Str.search_forward (Str.regexp_string what) l 0); true
           with Not_found -> false)
        else go ()
  in
  go ()

(* keeps the block out of any stack slot of the caller *)
let[@inline never] first_addr r = P.addr_of (Option.get !r)

let test_block_outlives_close () =
  Testutil.with_name "shmpool-a" @@ fun na ->
  Testutil.with_name "shmpool-b" @@ fun nb ->
  let a = P.create ~name:na (8 * ps) in
  let stale = ref (Some (P.alloc a ps)) in
  let sub = ref (Some (Array1.sub (Option.get !stale) 10 100)) in
  let addr = first_addr stale in
  P.close a;
  Alcotest.check_raises "a is closed" (Failure "Shmpool.alloc: pool is closed") (fun () ->
      ignore (P.alloc a 1));
  let b = P.create ~name:nb (8 * ps) in
  let blocks = List.init 8 (fun _ -> let m = P.alloc b ps in Array1.fill m 'b'; m) in
  Array1.fill (Option.get !stale) 'X';
  List.iteri
    (fun i m ->
      for k = 0 to ps - 1 do
        if m.{k} <> 'b' then Alcotest.failf "block %d of b overwritten at byte %d" i k
      done)
    blocks;
  check_clean b;
  Alcotest.(check int) "b's blocks" 8 (P.stats b).live_blocks;
  Alcotest.(check char) "the stale block writes a's memory" 'X' (Option.get !stale).{0};
  Alcotest.check_raises "the stale block is not b's"
    (Invalid_argument "Shmpool.free: not the start of a live block") (fun () ->
      P.free b (Option.get !stale));
  Alcotest.(check bool) "a stays mapped while a block of it lives" true (mapped_as na addr);
  stale := None;
  Gc.full_major ();
  Alcotest.(check bool) "... and while a sub-array of one lives" true (mapped_as na addr);
  (Option.get !sub).{0} <- 'y';
  sub := None;
  Gc.full_major ();
  Alcotest.(check bool) "a is unmapped once no view of it is left" false (mapped_as na addr);
  List.iter (P.free b) blocks;
  check_clean b;
  P.close b

let test_anonymous_unmapped_after_gc () =
  (* many views (1000 blocks, their sub-arrays) share one count *)
  let pool = P.create (1000 * ps) in
  let blocks = ref (Array.init 1000 (fun _ -> P.alloc pool ps)) in
  let subs = ref (Array.map (fun m -> Array1.sub m 1 1) !blocks) in
  let addr = P.addr_of !blocks.(0) in
  Array.iter (P.free pool) !blocks;
  P.close pool;
  Gc.full_major ();
  Alcotest.(check bool) "mapped while views live" true (mapped_as "memfd:shmpool" addr);
  blocks := [||];
  Gc.full_major ();
  Alcotest.(check bool) "mapped while sub-arrays live" true (mapped_as "memfd:shmpool" addr);
  Array.iter (fun m -> m.{0} <- 'z') !subs;
  subs := [||];
  Gc.full_major ();
  Alcotest.(check bool) "unmapped after the last view" false (mapped_as "memfd:shmpool" addr);
  (* an open pool whose views are all dropped stays mapped *)
  let pool = P.create ps in
  let addr = P.addr_of (P.alloc pool ps) in
  Gc.full_major ();
  Alcotest.(check bool) "open pool stays mapped" true (mapped_as "memfd:shmpool" addr);
  P.close pool

let[@inline never] format_file_and_keep_a_block file blk ~close =
  let fd = Unix.openfile file [ Unix.O_RDWR ] 0o600 in
  let m = Bigarray.array1_of_genarray (Unix.map_file fd Bigarray.char Bigarray.c_layout true [| 64 * ps |]) in
  Unix.close fd;
  let pool = P.format_in_place m in
  let b = P.alloc pool (2 * ps) in
  Array1.fill b 'k';
  blk := Some b;
  if close then P.close pool;
  P.addr_of b

let[@inline never] use_block blk =
  let b = Option.get !blk in
  Array1.fill b 'z';
  if b.{(2 * ps) - 1} <> 'z' then failwith "block lost its write"

let test_in_place_block_outlives_close () =
  (* in a child: before the fix, the block's memory was unmapped by the GC
     and touching it killed the process *)
  let file = Filename.temp_file "shmpool-inplace" ".bin" in
  Fun.protect ~finally:(fun () -> Sys.remove file) @@ fun () ->
  let base = Filename.basename file in
  let pid =
    Testutil.fork (fun () ->
        let blk = ref None in
        let addr = format_file_and_keep_a_block file blk ~close:true in
        Gc.full_major ();
        Gc.compact ();
        if not (mapped_as base addr) then failwith "unmapped while a block of it lives";
        use_block blk;
        blk := None;
        Gc.full_major ();
        if mapped_as base addr then failwith "still mapped after the last block went";
        (* a pool dropped without close keeps its memory: the pool may still
           be flushed at exit *)
        let addr = format_file_and_keep_a_block file blk ~close:false in
        blk := None;
        Gc.full_major ();
        Gc.compact ();
        if not (mapped_as base addr) then failwith "an open pool's memory was unmapped")
  in
  Testutil.wait_ok pid

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
          Alcotest.test_case "bad names, 100 times, then normal work" `Quick test_bad_names;
          Alcotest.test_case "names are bytes: non-UTF-8, longest" `Quick test_byte_names;
          Alcotest.test_case "a block used after close is not another pool's" `Quick
            test_block_outlives_close;
          Alcotest.test_case "the mapping goes with its last view" `Quick
            test_anonymous_unmapped_after_gc;
          Alcotest.test_case "in place: blocks keep the caller's memory" `Quick
            test_in_place_block_outlives_close;
        ] );
    ]
