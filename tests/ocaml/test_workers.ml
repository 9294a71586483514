(* The drop-in pool used as users use it: a pool created by the master
   before Netmcore.startup, workers started with ~inherit_resources that
   allocate, stamp, exchange addresses, verify and free each other's blocks;
   then a worker SIGKILLed in the middle of its alloc/free loop while the
   others go on, and a fresh worker after it. Then, side by side with
   OCamlnet's own pool: a pool created by a worker, and stats after joining
   a worker that freed what it allocated. *)

module M = Shmpool_netmcore.Netmcore_mempool

let ps = Shmpool.page_size
let nworkers = 3
let rounds = 2000

(* mailbox layout (one page, allocated by the master): slot i (8 words of
   8 bytes): 0 = address of worker i's shared block, 1 = its size,
   2 = pid of the victim; word 64 = workers done with phase 1 *)
let get, set = Testutil_mcore.(get, set)
let wait_until what f = Testutil_mcore.wait_until ~timeout:20.0 ~poll:0.001 what f

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

(* Side by side with the original (one functor over the module, two
   instances): what a user's program can see through Netmcore workers. *)
module type MEMPOOL = module type of Netmcore_mempool

let show f = try f () with Failure m -> "Failure: " ^ m | e -> Printexc.to_string e
let not_shared =
  "Failure: Netmcore.get_resource: The `Posix_shm_preallocated_sc resource exists but is not \
   shared with this worker"

(* A pool created by a worker: Netmcore creates the object in the master on
   the worker's request, so the workers started later that inherit it (`All
   or `Resources [p]) see it at the master's address. The original's creating
   worker gets Netmcore's error on every use; ours uses the pool at once,
   through a mapping of its own (at its own address: blocks are passed to
   later workers by offset). *)
module In_worker (P : MEMPOOL) = struct
  let writer (id, c) =
    match P.alloc_mem id (2 * ps) with
    | m ->
        fill m c;
        Ok (Netsys_mem.memory_address m, Bigarray.Array1.dim m, P.shm_name id)
    | exception e -> Error (Printexc.to_string e)

  let writer_fork, writer_join = Netmcore_process.def_process writer

  (* the block the writer reported, at the same address, with its contents *)
  let reader (id, addr, len, c) =
    show (fun () ->
        if P.size_mem_at_addr id addr <> len then failwith "size_mem_at_addr";
        let m = Netsys_mem.grab addr len in
        verify m c "the writer's block";
        P.free_mem id m;
        "read and freed")

  let reader_fork, reader_join = Netmcore_process.def_process reader

  (* The only allocation's offset, from debug_info (both pools list
     "allocations (offs->bsize): {off->size,...}"). *)
  let only_allocation id =
    let d = P.debug_info id in
    let k = "allocations (offs->bsize): {" in
    let i = Str.search_forward (Str.regexp_string k) d 0 + String.length k in
    match String.split_on_char ',' (String.sub d i (String.index_from d i '}' - i)) with
    | [ a ] -> Scanf.sscanf a "%d->%d" (fun off _ -> off)
    | l -> failwith (Printf.sprintf "%d allocations" (List.length l))

  (* A block the creating worker wrote, found by its offset at this
     worker's address of the pool (Netmcore's mapping). *)
  let peek (id, off, len, c, free) =
    show (fun () ->
        let base =
          match (Netmcore.get_resource id)#repr with
          | `Posix_shm_preallocated_sc (_, mem, _) -> Netsys_mem.memory_address mem
          | _ -> failwith "not a preallocated shm"
        in
        let addr = Nativeint.add base (Nativeint.of_int off) in
        if P.size_mem_at_addr id addr <> len then failwith "size_mem_at_addr";
        let m = Netsys_mem.grab addr len in
        verify m c "the creator's block";
        if free then (P.free_mem id m; "read and freed") else "read")

  let peek_fork, peek_join = Netmcore_process.def_process peek

  let stats id = match P.stats id with s -> Ok s | exception e -> Error (show (fun () -> raise e))
  let stats_fork, stats_join = Netmcore_process.def_process stats

  type outcome = {
    creator_alloc : string;
    creator_stats : string;
    creator_heap : string;  (** our Netmcore_heap.create_heap there *)
    creator_read_all : string;  (** the creator's block, read by a later `All worker *)
    creator_read_res : string;  (** ... and freed by a `Resources [p] worker *)
    fresh : (int * int * int, string) result;  (** from a later worker *)
    read_all : string;  (** by a later worker with `All *)
    read_res : string;  (** by a later worker with `Resources [p] *)
    outsider : (int * int * int, string) result;  (** `Resources [] *)
    final : (int * int * int, string) result;
    shm : string;
  }

  let creator () =
    let id = P.create_mempool (64 * ps) in
    let run inh fp jp arg =
      Netmcore_process.join jp (Netmcore_process.start ~inherit_resources:inh fp arg)
    in
    let stats_in inh = Option.value (run inh stats_fork stats_join id) ~default:(Error "no result") in
    let fresh = stats_in `All in
    let creator_alloc =
      show (fun () ->
          let m = P.alloc_mem id ps in
          fill m 'z';
          verify m 'z' "the creator's own block";
          if P.size_mem id m <> ps then failwith "size_mem";
          P.free_mem id m;
          "allocated")
    in
    let creator_stats = show (fun () -> ignore (P.stats id); "stats") in
    let creator_heap =
      show (fun () ->
          ignore (Shmpool_netmcore.Netmcore_heap.create_heap id 4096 (ref 1));
          "heap created")
    in
    let write c = Option.value (run `All writer_fork writer_join (id, c)) ~default:(Error "no result") in
    let read inh w c =
      match w with
      | Ok (addr, len, _) -> Option.value (run inh reader_fork reader_join (id, addr, len, c)) ~default:"no result"
      | Error e -> "writer: " ^ e
    in
    let creator_read_all, creator_read_res =
      match P.alloc_mem id (3 * ps) with
      | exception e -> (show (fun () -> raise e), show (fun () -> raise e))
      | m ->
          fill m 'k';
          let off = only_allocation id in
          let peek inh free =
            Option.value (run inh peek_fork peek_join (id, off, 3 * ps, 'k', free)) ~default:"no result"
          in
          let a = peek `All false in
          (a, peek (`Resources [ id ]) true)
    in
    let w1 = write 'a' in
    let read_all = read `All w1 'a' in
    let w2 = write 'b' in
    let read_res = read (`Resources [ id ]) w2 'b' in
    let outsider = stats_in (`Resources []) in
    let final = stats_in `All in
    let shm = match w1 with Ok (_, _, n) -> n | Error _ -> "" in
    { creator_alloc; creator_stats; creator_heap; creator_read_all; creator_read_res; fresh; read_all; read_res; outsider; final; shm }

  let creator_fork, creator_join = Netmcore_process.def_process creator
end

module In_worker_orig = In_worker (Netmcore_mempool)
module In_worker_ours = In_worker (Shmpool_netmcore.Netmcore_mempool)

(* The blocks a worker freed wait in its cache (ours). The worker's exit,
   where a cache is given back at the latest, is held back by an at_exit
   gate until the check after join is done; a worker defined with
   Shmpool_netmcore.Netmcore_process gives its cache back when its function
   returns, so stats after join are those of before it started. *)
module type DEF_PROCESS = sig
  val name : string

  (* [def f] at module initialisation defines a process (with one of the
     def_process under test); the result starts it with `All and joins it *)
  val def : (Netmcore.res_id * nativeint -> string) -> Netmcore.res_id * nativeint -> string option
end

(* a [def] over a typed def_process of Netmcore_process's type *)
let typed def_process f =
  let fp, jp = def_process f in
  fun arg -> Netmcore_process.join jp (Netmcore_process.start ~inherit_resources:`All fp arg)

(* The blocks debug_info lists as held in per-process caches (ours only). *)
let cached_in_processes id =
  let d = Shmpool.debug_info (Shmpool_netmcore.shmpool id) in
  let k = "cached in processes (offs->bsize): {" in
  let i = Str.search_forward (Str.regexp_string k) d 0 + String.length k in
  String.sub d i (String.index_from d i '}' - i)

module Cache_at_join (P : MEMPOOL) (D : DEF_PROCESS) (C : sig
  val cached : Netmcore.res_id -> string
end) =
struct
  let churn (id, mb_addr) =
    let mb = Netsys_mem.grab mb_addr ps in
    at_exit (fun () -> try wait_until "the check after join" (fun () -> get mb 1 = 1) with _ -> ());
    let ms = List.init 12 (fun i -> P.alloc_mem id ((i mod 3 + 1) * ps)) in
    List.iter (fun m -> fill m 'c') ms;
    List.iter (P.free_mem id) ms;
    "ok"

  let churn_run = D.def churn

  type outcome = {
    result : string option;
    before : int * int * int;
    after_join : int * int * int;
    cached_after_join : string;
  }

  let orchestrate (id, mb_addr) =
    let mb = Netsys_mem.grab mb_addr ps in
    let before = P.stats id in
    let result = churn_run (id, mb_addr) in
    let after_join = P.stats id in
    let cached_after_join = C.cached id in
    set mb 1 1;
    { result; before; after_join; cached_after_join }

  let orchestrate_fork, orchestrate_join = Netmcore_process.def_process orchestrate
end

module Plain = struct
  let name = "OCamlnet's Netmcore_process"
  let def f = typed Netmcore_process.def_process f
end

module Flushing = struct
  let name = "Shmpool_netmcore.Netmcore_process"
  let def f = typed Shmpool_netmcore.Netmcore_process.def_process f
end

(* the untyped layer underneath: Netmcore.def_process on encapsulated
   values *)
module Flushing_raw = struct
  module Arg = Netplex_encap.Make_encap (struct
    type t = Netmcore.res_id * nativeint
  end)

  module Res = Netplex_encap.Make_encap (struct
    type t = string
  end)

  let name = "Shmpool_netmcore.Netmcore"

  let def f =
    let fp, jp = Shmpool_netmcore.Netmcore.def_process (fun e -> Res.wrap (f (Arg.unwrap e))) in
    fun arg ->
      let pid = Netmcore.start ~inherit_resources:`All fp (Arg.wrap arg) in
      Option.map Res.unwrap (Netmcore.join jp pid)
end

module No_cache = struct
  let cached _ = ""
end

module Ours_cache = struct
  let cached = cached_in_processes
end

module Cache_orig = Cache_at_join (Netmcore_mempool) (Plain) (No_cache)
module Cache_ours = Cache_at_join (M) (Flushing) (Ours_cache)
module Cache_ours_raw = Cache_at_join (M) (Flushing_raw) (Ours_cache)
module Cache_ours_plain = Cache_at_join (M) (Plain) (Ours_cache)

let netmcore_run = Testutil_mcore.netmcore_run

(* [create], a mailbox page, [orchestrate]; then the stats once every
   worker has exited, and the pool freed and unlinked. *)
let cache_case sockdir create alloc free stats unlink fp jp =
  let id = create (4 * 1024 * 1024) in
  Fun.protect ~finally:(fun () -> try unlink id with _ -> ()) (fun () ->
      let mb = alloc id ps in
      fill mb '\000';
      let o = netmcore_run sockdir fp jp (id, Netsys_mem.memory_address mb) in
      let after_exit = stats id in
      free id mb;
      (o, after_exit))

let () =
  let pool = M.create_mempool (4 * 1024 * 1024) in
  let sockdir = Testutil_mcore.sockdir "shmpool-workers" in
  (* at_exit also runs in every Netmcore worker (forked from here) when it
     exits: only the master may clean up (the pool before the directory,
     at_exit handlers running last-registered first). *)
  let master = Unix.getpid () in
  at_exit (fun () -> if Unix.getpid () = master then try M.unlink_mempool pool with _ -> ());
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
  let in_worker_orig = netmcore_run sockdir In_worker_orig.creator_fork In_worker_orig.creator_join () in
  let in_worker_ours = netmcore_run sockdir In_worker_ours.creator_fork In_worker_ours.creator_join () in
  (* Netmcore destroys a resource when the last process that asked for it
     ends: here, the creating worker. Remove what would remain. *)
  let shm_left =
    List.filter_map
      (fun o ->
        match o with
        | Some n when n <> "" && Sys.file_exists ("/dev/shm" ^ n) ->
            (try Netsys_posix.shm_unlink n with _ -> ());
            Some n
        | _ -> None)
      [ Option.map (fun o -> o.In_worker_orig.shm) in_worker_orig;
        Option.map (fun o -> o.In_worker_ours.shm) in_worker_ours ]
  in
  let module O = Netmcore_mempool in
  let cache_orig =
    cache_case sockdir O.create_mempool O.alloc_mem O.free_mem O.stats O.unlink_mempool
      Cache_orig.orchestrate_fork Cache_orig.orchestrate_join
  in
  let cache_ours =
    cache_case sockdir M.create_mempool M.alloc_mem M.free_mem M.stats M.unlink_mempool
      Cache_ours.orchestrate_fork Cache_ours.orchestrate_join
  in
  let cache_ours_raw =
    cache_case sockdir M.create_mempool M.alloc_mem M.free_mem M.stats M.unlink_mempool
      Cache_ours_raw.orchestrate_fork Cache_ours_raw.orchestrate_join
  in
  let cache_ours_plain =
    cache_case sockdir M.create_mempool M.alloc_mem M.free_mem M.stats M.unlink_mempool
      Cache_ours_plain.orchestrate_fork Cache_ours_plain.orchestrate_join
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
          test_case "a pool created in a worker, used by it and later workers" `Quick (fun () ->
              let total = 64 * ps in
              let open In_worker_ours in
              (match in_worker_orig, in_worker_ours with
              | None, _ -> fail "original: the creating worker returned nothing"
              | _, None -> fail "ours: the creating worker returned nothing"
              | Some o, Some s ->
                  let tf = function Ok (t, f, _) -> Ok (t, f) | Error e -> Error e in
                  (* the original's creating worker cannot use its pool; ours can *)
                  check string "the original's creator gets Netmcore's error" not_shared
                    o.In_worker_orig.creator_alloc;
                  check string "for stats too" not_shared o.In_worker_orig.creator_stats;
                  check string "our creator allocates, writes, frees" "allocated" s.creator_alloc;
                  check string "and reads stats" "stats" s.creator_stats;
                  (* heaps hold addresses: not on its own mapping *)
                  check bool ("but creates no heap there: " ^ s.creator_heap) true
                    (String.length s.creator_heap > 40
                    && String.sub s.creator_heap 0 40 = "Failure: Netmcore_heap.create_heap: this");
                  check string "the creator's block, read by a later `All worker" "read" s.creator_read_all;
                  check string "... and read and freed by a `Resources [p] worker" "read and freed"
                    s.creator_read_res;
                  List.iter
                    (fun (what, o, s) -> check string ("the same as the original: " ^ what) o s)
                    [
                      ("read by a later `All worker", o.In_worker_orig.read_all, s.read_all);
                      ("read by a later `Resources [p] worker", o.In_worker_orig.read_res, s.read_res);
                    ];
                  check (result (triple int int int) string) "fresh, seen from a later worker"
                    (Ok (total, total, total)) s.fresh;
                  check string "written by a later worker, read at its address by another (`All)"
                    "read and freed" s.read_all;
                  check string "... and by a `Resources [p] worker" "read and freed" s.read_res;
                  check (result (triple int int int) string) "a `Resources [] worker gets Netmcore's error"
                    (Error not_shared) s.outsider;
                  check (result (triple int int int) string) "the original's too" (Error not_shared)
                    o.In_worker_orig.outsider;
                  check (result (pair int int) string) "everything freed (total, free)" (tf s.fresh) (tf s.final);
                  check (result (pair int int) string) "the original: everything freed"
                    (tf o.In_worker_orig.fresh) (tf o.In_worker_orig.final);
                  check (result int string) "the same total as the original's"
                    (Result.map (fun (t, _, _) -> t) o.In_worker_orig.fresh)
                    (Result.map (fun (t, _, _) -> t) s.fresh));
              check (list string) "both destroyed by Netmcore when the creating worker ended" [] shm_left);
          test_case "stats after join are those of before the worker" `Quick (fun () ->
              let stats3 = triple int int int in
              let check_case name (o, after_exit) result before after_join cached =
                match o with
                | None -> fail (name ^ ": the first process returned nothing")
                | Some o ->
                    check (option string) (name ^ ": worker") (Some "ok") (result o);
                    check stats3 (name ^ ": after join") (before o) (after_join o);
                    check string (name ^ ": no blocks cached in processes after join") "" (cached o);
                    check stats3 (name ^ ": once the worker has exited") (before o) after_exit
              in
              check_case "original" cache_orig
                (fun o -> o.Cache_orig.result) (fun o -> o.Cache_orig.before)
                (fun o -> o.Cache_orig.after_join) (fun o -> o.Cache_orig.cached_after_join);
              check_case ("ours, " ^ Flushing.name) cache_ours
                (fun o -> o.Cache_ours.result) (fun o -> o.Cache_ours.before)
                (fun o -> o.Cache_ours.after_join) (fun o -> o.Cache_ours.cached_after_join);
              check_case ("ours, " ^ Flushing_raw.name) cache_ours_raw
                (fun o -> o.Cache_ours_raw.result) (fun o -> o.Cache_ours_raw.before)
                (fun o -> o.Cache_ours_raw.after_join) (fun o -> o.Cache_ours_raw.cached_after_join));
          test_case "with OCamlnet's Netmcore_process: given back at exit" `Quick (fun () ->
              (* the control: the worker's frees did go to its cache, which
                 it then holds until it exits *)
              match cache_ours_plain with
              | None, _ -> fail "the first process returned nothing"
              | Some o, after_exit ->
                  check (option string) "worker" (Some "ok") o.Cache_ours_plain.result;
                  check bool "blocks still cached after join" true (o.Cache_ours_plain.cached_after_join <> "");
                  check (triple int int int) "once the worker has exited" o.Cache_ours_plain.before after_exit);
          test_case "everything back" `Quick (fun () ->
              check int "free" (4 * 1024 * 1024) free;
              check int "contiguous" free contiguous;
              check (list string) "check after reclaim" [] (Shmpool.check sp));
        ] );
    ]
