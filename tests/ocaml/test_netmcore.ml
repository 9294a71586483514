(* The drop-in shim, in the master process (no workers): every value,
   bad inputs, and the exact signature of OCamlnet's Netmcore_mempool. *)

module Orig = Netmcore_mempool
module M = Shmpool_netmcore.Netmcore_mempool

(* The compatibility contract: these lines compiling are the test. *)
module _ : module type of Netmcore_mempool = Shmpool_netmcore.Netmcore_mempool
module _ : module type of Netmcore_process = Shmpool_netmcore.Netmcore_process
module _ : module type of Netmcore = Shmpool_netmcore.Netmcore

(* ... and the fork and join points of both Netmcore_process are one type *)
let _mix : unit -> int Netmcore_process.fork_point * string Netmcore_process.join_point =
 fun () -> Shmpool_netmcore.Netmcore_process.def_process (fun (n : int) -> string_of_int n)

let ps = Shmpool.page_size
let pool_of = Shmpool_netmcore.shmpool
let clean id = Alcotest.(check (list string)) "check clean" [] (Shmpool.check (pool_of id))

(* Every pool made here is unlinked at exit, even when a test fails (by
   the name Netmcore knows: our lookup may be what failed). *)
let made = ref []

let unlink_any unlink_mempool id =
  try unlink_mempool id with _ -> ( try Netsys_posix.shm_unlink (Netmcore.get_shm id) with _ -> ())

let () =
  at_exit (fun () ->
      List.iter (unlink_any M.unlink_mempool) !made)

let create ?alloc_really size =
  let id = M.create_mempool ?alloc_really size in
  made := id :: !made;
  id

let unchanged id f =
  let s = M.stats id and d = M.debug_info id in
  f ();
  Alcotest.(check (triple int int int)) "stats unchanged" s (M.stats id);
  Alcotest.(check string) "debug_info unchanged" d (M.debug_info id);
  clean id

let test_basic () =
  let id = create (16 * 1024 * 1024) in
  let total, free, contiguous = M.stats id in
  Alcotest.(check int) "total: the size asked for" (16 * 1024 * 1024) total;
  Alcotest.(check int) "free" total free;
  Alcotest.(check int) "contiguous" free contiguous;
  let name = M.shm_name id in
  Alcotest.(check bool) "shm name" true (String.length name > 9 && String.sub name 0 9 = "/mempool_");
  Alcotest.(check bool) "exists" true (Sys.file_exists ("/dev/shm" ^ name));
  let m = M.alloc_mem id 10000 in
  Alcotest.(check int) "rounded" (3 * ps) (Bigarray.Array1.dim m);
  Alcotest.(check int) "size_mem" (3 * ps) (M.size_mem id m);
  Alcotest.(check int) "size_mem_at_addr" (3 * ps) (M.size_mem_at_addr id (Netsys_mem.memory_address m));
  Netsys_mem.blit_string_to_memory "hello" 0 m 0 5;
  Alcotest.(check string) "memory works with Netsys_mem" "hello"
    (let b = Bytes.create 5 in Netsys_mem.blit_memory_to_bytes m 0 b 0 5; Bytes.to_string b);
  (* only the start address matters, as Netmcore_heap relies on *)
  M.free_mem id (Netsys_mem.grab (Netsys_mem.memory_address m) 1);
  Alcotest.(check int) "free again" free (let _, f, _ = M.stats id in f);
  let c = M.sem_container id in
  Alcotest.(check bool) "sem container prefix" true (String.length (Netsys_sem.prefix c) > 0);
  clean id;
  M.unlink_mempool id;
  Alcotest.(check bool) "unlinked" false (Sys.file_exists ("/dev/shm" ^ name));
  (* mappings stay valid after unlink *)
  let m = M.alloc_mem id ps in
  M.free_mem id m

let test_bad_input () =
  let id = create (64 * ps) and other = create (4 * ps) in
  let m = M.alloc_mem id (2 * ps) in
  let o = M.alloc_mem other ps in
  let nf = Failure "Netmcore_mempool.free_mem: memory block not found" in
  unchanged id (fun () ->
      Alcotest.check_raises "0" (Invalid_argument "Netmcore_mempool.alloc_mem: bad size") (fun () ->
          ignore (M.alloc_mem id 0));
      Alcotest.check_raises "-1" (Invalid_argument "Netmcore_mempool.alloc_mem: bad size") (fun () ->
          ignore (M.alloc_mem id (-1)));
      Alcotest.check_raises "max_int" Orig.Out_of_pool_memory (fun () -> ignore (M.alloc_mem id max_int));
      Alcotest.check_raises "too big" Orig.Out_of_pool_memory (fun () -> ignore (M.alloc_mem id (63 * ps)));
      Alcotest.check_raises "interior" nf (fun () -> M.free_mem id (Bigarray.Array1.sub m ps ps));
      Alcotest.check_raises "interior byte" nf (fun () -> M.free_mem id (Bigarray.Array1.sub m 7 1));
      Alcotest.check_raises "foreign" nf (fun () -> M.free_mem id (Bigarray.Array1.create Bigarray.char Bigarray.c_layout 64));
      Alcotest.check_raises "other pool" nf (fun () -> M.free_mem id o);
      Alcotest.check_raises "size_mem interior" Not_found (fun () -> ignore (M.size_mem id (Bigarray.Array1.sub m ps 1)));
      Alcotest.check_raises "size_mem_at_addr" Not_found (fun () -> ignore (M.size_mem_at_addr id 4096n)));
  M.free_mem id m;
  unchanged id (fun () -> Alcotest.check_raises "double free" nf (fun () -> M.free_mem id m));
  Alcotest.check_raises "unknown id" (Netmcore.No_resource (`Resource 999_999)) (fun () ->
      ignore (M.stats (`Resource 999_999)));
  Alcotest.check_raises "create 0" (Invalid_argument "Netmcore_mempool.create_mempool: bad size") (fun () ->
      ignore (M.create_mempool 0));
  Alcotest.check_raises "create -5" (Invalid_argument "Netmcore_mempool.create_mempool: bad size") (fun () ->
      ignore (M.create_mempool (-5)));
  (* a Netmcore resource that is not a pool *)
  let rid, name, _ = Netmcore.create_preallocated_shm_sc "/notapool" (8 * ps) in
  Fun.protect ~finally:(fun () -> try Netsys_posix.shm_unlink name with _ -> ()) (fun () ->
      Alcotest.check_raises "not a pool" (Failure "Netmcore_mempool: this resource is not a pool")
        (fun () -> ignore (M.alloc_mem rid ps)))

let test_wrong_id_leaves_it_alone () =
  (* an OCamlnet pool passed to ours by mistake: an error, and the
     resource must survive (in Netmcore the last release destroys it) *)
  let o = Orig.create_mempool (64 * ps) in
  Fun.protect ~finally:(fun () -> try Orig.unlink_mempool o with _ -> ()) (fun () ->
      let name = Orig.shm_name o in
      Alcotest.check_raises "not a pool" (Failure "Netmcore_mempool: this resource is not a pool")
        (fun () -> ignore (M.stats o));
      Alcotest.(check bool) "its shm object is still there" true (Sys.file_exists ("/dev/shm" ^ name));
      Alcotest.(check string) "and still a Netmcore resource" name (Orig.shm_name o))

let test_exception_identity () =
  let id = create ps in
  let _m = M.alloc_mem id ps in
  match M.alloc_mem id ps with
  | _ -> Alcotest.fail "expected Out_of_pool_memory"
  | exception Netmcore_mempool.Out_of_pool_memory -> ()

let test_one_page_blocks () =
  let pages = 2048 in
  let id = create (pages * ps) in
  let ms = Array.init pages (fun _ -> M.alloc_mem id 1) in
  Alcotest.check_raises "full" M.Out_of_pool_memory (fun () -> ignore (M.alloc_mem id 1));
  clean id;
  Array.iter (M.free_mem id) ms;
  let _, free, contiguous = M.stats id in
  Alcotest.(check int) "all back" (pages * ps) free;
  Alcotest.(check int) "coalesced" (pages * ps) contiguous

let test_tiny () =
  List.iter
    (fun pages ->
      let id = create (pages * ps) in
      let ms = List.init pages (fun _ -> M.alloc_mem id ps) in
      List.iter (fun m -> Bigarray.Array1.fill m 'x') ms;
      List.iter (M.free_mem id) ms;
      Alcotest.(check int) "whole" (pages * ps) (Bigarray.Array1.dim (M.alloc_mem id (pages * ps)));
      clean id)
    [ 1; 2 ]

let test_alloc_really () =
  let id = create ~alloc_really:true (256 * ps) in
  let m = M.alloc_mem id (256 * ps) in
  Bigarray.Array1.fill m 'r';
  M.free_mem id m;
  clean id

let test_debug () =
  let id = create (8 * ps) in
  let lines = ref [] in
  let saved = !Netlog.Debug.current_dlogger in
  Netlog.Debug.current_dlogger := (fun _mname msg -> lines := msg :: !lines);
  Fun.protect ~finally:(fun () ->
      Netlog.Debug.current_dlogger := saved;
      M.Debug.enable_alloc := false)
    (fun () ->
      M.Debug.enable_alloc := true;
      let m = M.alloc_mem id ps in
      M.free_mem id m);
  let (`Resource n) = id in
  let has prefix = List.exists (fun l -> String.length l >= String.length prefix && String.sub l 0 (String.length prefix) = prefix) !lines in
  Alcotest.(check bool) "alloc line" true (has (Printf.sprintf "alloc (id=%d) size=%d addr=0x" n ps));
  Alcotest.(check bool) "free line" true (has (Printf.sprintf "free (id=%d) addr=0x" n));
  let d = M.debug_info id in
  let first4 = List.filteri (fun i _ -> i < 5) (String.split_on_char '\n' d) in
  Alcotest.(check (list string)) "the original's leading lines, in its order"
    [ "pool_size"; "pool_free"; "pool_free_contiguous"; "pool_start"; "allocations (offs->bsize)" ]
    (List.map (fun l -> String.trim (List.hd (String.split_on_char '=' (List.hd (String.split_on_char ':' l))))) first4);
  List.iter
    (fun k -> Alcotest.(check bool) k true (Str.string_match (Str.regexp_string k) d 0 || (try ignore (Str.search_forward (Str.regexp_string k) d 0); true with Not_found -> false)))
    [ "pool_size = "; "pool_free = "; "pool_free_contiguous = "; "pool_start = "; "allocations (offs->bsize): {" ]

(* [stats]' total, side by side with the original: the size asked for,
   rounded up to pages, so that a second pool sized from the first one's
   total is the same size; debug_info's pool_size says the same. Only ours
   has the header outside the payload: a fresh pool is all free. *)
module type MEMPOOL = module type of Netmcore_mempool

let pool_size_line d =
  let l = List.find (fun l -> String.length l > 12 && String.sub l 0 12 = "pool_size = ") (String.split_on_char '\n' d) in
  int_of_string (String.sub l 12 (String.length l - 12))

module Totals (P : MEMPOOL) = struct
  let run ~fresh_is_all_free =
    List.iter
      (fun size ->
        let rounded = (size + ps - 1) / ps * ps in
        let id = P.create_mempool size in
        Fun.protect ~finally:(fun () -> unlink_any P.unlink_mempool id) (fun () ->
            let total, free, contiguous = P.stats id in
            let what = Printf.sprintf "create_mempool %d" size in
            Alcotest.(check int) (what ^ ": total") rounded total;
            Alcotest.(check int) (what ^ ": debug_info pool_size") total (pool_size_line (P.debug_info id));
            if fresh_is_all_free then Alcotest.(check (pair int int)) (what ^ ": free, contiguous") (total, total) (free, contiguous)
            else Alcotest.(check bool) (what ^ ": free <= total") true (free <= total && contiguous <= free);
            let id2 = P.create_mempool total in
            Fun.protect ~finally:(fun () -> unlink_any P.unlink_mempool id2) (fun () ->
                let total2, _, _ = P.stats id2 in
                Alcotest.(check int) (what ^ ": a pool of the first's total") total total2)))
      [ 3 * ps; 10_000; 64 * ps; (1024 * 1024) + 1 ]
end

module Totals_orig = Totals (Netmcore_mempool)
module Totals_ours = Totals (Shmpool_netmcore.Netmcore_mempool)

let test_totals () =
  Totals_orig.run ~fresh_is_all_free:false;
  Totals_ours.run ~fresh_is_all_free:true

let () =
  Alcotest.run "shmpool.netmcore"
    [
      ( "Netmcore_mempool (master)",
        [
          Alcotest.test_case "create/alloc/size/free/stats/names" `Quick test_basic;
          Alcotest.test_case "stats' total is the size asked for (as the original's)" `Quick test_totals;
          Alcotest.test_case "bad input leaves the pool unchanged" `Quick test_bad_input;
          Alcotest.test_case "Out_of_pool_memory is the original's" `Quick test_exception_identity;
          Alcotest.test_case "a wrong id does not destroy the resource" `Quick
            test_wrong_id_leaves_it_alone;
          Alcotest.test_case "filled with 1-page blocks (no cap)" `Quick test_one_page_blocks;
          Alcotest.test_case "1- and 2-page pools" `Quick test_tiny;
          Alcotest.test_case "alloc_really" `Quick test_alloc_really;
          Alcotest.test_case "Debug.enable_alloc and debug_info" `Quick test_debug;
        ] );
    ]
