(* Bad input, fuzzed with QCheck, against Shmpool (a named pool) and the
   Netmcore shim (a pool made by create_mempool): free / free_mem, size /
   size_mem and size_at_addr / size_mem_at_addr get arbitrary sub-arrays of
   the pool's live blocks and of its whole mapping (header included), of
   the same shm object mapped a second time, of other pools' blocks and
   mappings, foreign bigarrays, freed blocks and random addresses; alloc /
   alloc_mem gets arbitrary ints. Each call must succeed exactly when the
   argument starts a live block (alloc: when the size fits the largest free
   run) and otherwise raise the documented exception, with stats and
   debug_info unchanged and check clean. A model of the live blocks gives
   the expected answer. *)

open Torture
open Bigarray
module M = Shmpool_netmcore.Netmcore_mempool

let suite = "fuzz"
let count = 2000 * scale
let pool_pages = 256

(* ----- the targets ----------------------------------------------------------- *)

type target = {
  tname : string;
  sp : Shmpool.t;  (** the pool, for stats and check *)
  alloc : int -> memory;
  free : memory -> unit;
  size : memory -> int;
  size_at_addr : nativeint -> int;
  free_error : exn;
  bad_size : exn;
  is_oom : exn -> bool;
  mapping : memory;  (** the whole shared object, as mapped here *)
  alias : memory;  (** the same object mapped a second time *)
  pool_start : int;  (** offset of the payload in the mapping *)
  mutable live : (nativeint * int) list;  (** the model: address -> size *)
  mutable freed : nativeint list;  (** recently freed addresses *)
}

let addr = Netsys_mem.memory_address

(* "key = value" line of debug_info *)
let debug_field d key =
  let l = List.find (fun l -> String.length l > String.length key && String.sub l 0 (String.length key + 3) = key ^ " = ") (String.split_on_char '\n' d) in
  int_of_string (String.sub l (String.length key + 3) (String.length l - String.length key - 3))

(* offset of the first live block, from "allocations (offs->bsize): {o->s,...}" *)
let only_block_offset d =
  let i = String.index d '{' in
  let j = String.index_from d i '-' in
  int_of_string (String.sub d (i + 1) (j - i - 1))

let map_again shm_name len =
  let fd = Unix.openfile ("/dev/shm" ^ shm_name) [ Unix.O_RDWR ] 0 in
  let m = array1_of_genarray (Unix.map_file fd char c_layout true [| len |]) in
  Unix.close fd;
  m

(* The mapping of a Shmpool pool: a block's address minus its offset. *)
let shmpool_target name =
  let sp = Shmpool.create ~name (pool_pages * ps) in
  let m = Shmpool.alloc sp ps in
  let d = Shmpool.debug_info sp in
  let base = Nativeint.sub (Shmpool.addr_of m) (Nativeint.of_int (only_block_offset d)) in
  Shmpool.free sp m;
  let total = (Shmpool.stats sp).total in
  {
    tname = "Shmpool";
    sp;
    alloc = Shmpool.alloc sp;
    free = Shmpool.free sp;
    size = Shmpool.size sp;
    size_at_addr = Shmpool.size_at_addr sp;
    free_error = Invalid_argument "Shmpool.free: not the start of a live block";
    bad_size = Invalid_argument "Shmpool.alloc: bad size";
    is_oom = (function Shmpool.Out_of_pool_memory -> true | _ -> false);
    mapping = Netsys_mem.grab base total;
    alias = map_again name total;
    pool_start = debug_field d "pool_start";
    live = [];
    freed = [];
  }

let mempool_target id =
  let sp = Shmpool_netmcore.shmpool id in
  let mapping =
    match (Netmcore.get_resource id)#repr with
    | `Posix_shm_preallocated_sc (_, mem, _) -> mem
    | _ -> failwith "not a preallocated shm"
  in
  {
    tname = "Netmcore_mempool";
    sp;
    alloc = M.alloc_mem id;
    free = M.free_mem id;
    size = M.size_mem id;
    size_at_addr = M.size_mem_at_addr id;
    free_error = Failure "Netmcore_mempool.free_mem: memory block not found";
    bad_size = Invalid_argument "Netmcore_mempool.alloc_mem: bad size";
    is_oom = (function M.Out_of_pool_memory -> true | _ -> false);
    mapping;
    alias = map_again (M.shm_name id) (Array1.dim mapping);
    pool_start = debug_field (M.debug_info id) "pool_start";
    live = [];
    freed = [];
  }

(* ----- what the generators describe -------------------------------------------- *)

(* Raw random numbers, resolved against the state when the case runs. *)
type where =
  | Map_any of int * int  (** anywhere in the mapping; offset, length *)
  | Map_header of int * int  (** in the header or the first payload page *)
  | Map_page of int * int * int  (** page boundary + delta, length *)
  | Block of int * int * int  (** live block (index), delta, length *)
  | Freed of int * int  (** a recently freed block *)
  | Alias of int * int * int  (** the object mapped again: a live block's offset + delta *)
  | Other_block of int * int * int  (** a live block of another pool *)
  | Other_map of int * int  (** anywhere in another pool's mapping *)
  | Foreign of int * int  (** a fresh bigarray: length, offset into it *)
  | Raw of int64  (** an address (size_at_addr only; a foreign bigarray otherwise) *)

let show_where = function
  | Map_any (o, l) -> Printf.sprintf "Map_any(%d,%d)" o l
  | Map_header (o, l) -> Printf.sprintf "Map_header(%d,%d)" o l
  | Map_page (p, d, l) -> Printf.sprintf "Map_page(%d,%d,%d)" p d l
  | Block (i, d, l) -> Printf.sprintf "Block(%d,%d,%d)" i d l
  | Freed (i, l) -> Printf.sprintf "Freed(%d,%d)" i l
  | Alias (i, d, l) -> Printf.sprintf "Alias(%d,%d,%d)" i d l
  | Other_block (i, d, l) -> Printf.sprintf "Other_block(%d,%d,%d)" i d l
  | Other_map (o, l) -> Printf.sprintf "Other_map(%d,%d)" o l
  | Foreign (n, o) -> Printf.sprintf "Foreign(%d,%d)" n o
  | Raw a -> Printf.sprintf "Raw(0x%Lx)" a

let gen_where =
  let open QCheck.Gen in
  let n = int_bound 1_000_000_000 in
  let len = frequency [ (3, int_bound 16); (3, int_bound (4 * ps)); (1, return 0); (1, int_bound (200 * ps)) ] in
  let delta = frequency [ (4, return 0); (2, int_range (-16) 16); (2, int_range (-2 * ps) (2 * ps)); (1, map (fun k -> k * ps) (int_range (-3) 3)) ] in
  frequency
    [
      (2, map2 (fun o l -> Map_any (o, l)) n len);
      (2, map2 (fun o l -> Map_header (o, l)) n len);
      (2, map3 (fun p d l -> Map_page (p, d, l)) n (int_range (-16) 16) len);
      (6, map3 (fun i d l -> Block (i, d, l)) n delta len);
      (2, map2 (fun i l -> Freed (i, l)) n len);
      (1, map3 (fun i d l -> Alias (i, d, l)) n delta len);
      (2, map3 (fun i d l -> Other_block (i, d, l)) n delta len);
      (1, map2 (fun o l -> Other_map (o, l)) n len);
      (1, map2 (fun n o -> Foreign (n, o)) (int_bound 20_000) n);
      (1, map (fun a -> Raw a) ui64);
    ]

(* ----- resolving ------------------------------------------------------------------ *)

let nth l i = List.nth l (i mod List.length l)

(* a sub-array of [m] at [off] (clamped into m) of at most [len] bytes *)
let sub m off len =
  let dim = Array1.dim m in
  let off = max 0 (min off (dim - 1)) in
  Array1.sub m off (min len (dim - off))

let off_in t a = Nativeint.to_int (Nativeint.sub a (addr t.mapping))

(* [others]: live blocks of other pools, with their pools' mappings *)
let resolve t ~others ~other_maps w : memory =
  let total = Array1.dim t.mapping in
  match w with
  | Map_any (o, l) -> sub t.mapping (o mod total) l
  | Map_header (o, l) -> sub t.mapping (o mod (t.pool_start + ps)) l
  | Map_page (p, d, l) -> sub t.mapping ((p mod (total / ps) * ps) + d) l
  | Block (i, d, l) when t.live <> [] -> sub t.mapping (off_in t (fst (nth t.live i)) + d) l
  | Freed (i, l) when t.freed <> [] -> sub t.mapping (off_in t (nth t.freed i)) l
  | Alias (i, d, l) when t.live <> [] -> sub t.alias (off_in t (fst (nth t.live i)) + d) l
  | Other_block (i, d, l) ->
      let m = nth others i in
      let inside mp =
        let o = Nativeint.to_int (Nativeint.sub (addr m) (addr mp)) in
        o >= 0 && o < Array1.dim mp
      in
      let mp = List.find inside other_maps in
      sub mp (Nativeint.to_int (Nativeint.sub (addr m) (addr mp)) + d) l
  | Other_map (o, l) ->
      let mp = nth other_maps o in
      sub mp (o mod Array1.dim mp) l
  | Foreign (n, o) ->
      let m = Array1.create char c_layout (n + 1) in
      sub m (o mod (n + 1)) n
  | Raw _ | Block _ | Freed _ | Alias _ -> Array1.create char c_layout 8

let address_of t ~others ~other_maps = function
  | Raw a -> Int64.to_nativeint a
  | w -> addr (resolve t ~others ~other_maps w)

(* ----- checking ------------------------------------------------------------------- *)

let counts = Hashtbl.create 16
let tally k = Hashtbl.replace counts k (1 + try Hashtbl.find counts k with Not_found -> 0)

let fail fmt = QCheck.Test.fail_reportf fmt

let snapshot t = (Shmpool.stats t.sp, Shmpool.debug_info t.sp)

let unchanged t before what =
  let after = snapshot t in
  if after <> before then fail "%s: %s changed the pool:\nbefore:\n%s\nafter:\n%s" t.tname what (snd before) (snd after);
  match Shmpool.check t.sp with [] -> true | l -> fail "%s: %s: check: %s" t.tname what (String.concat "; " l)

let clean t what = match Shmpool.check t.sp with [] -> true | l -> fail "%s: %s: check: %s" t.tname what (String.concat "; " l)

let remember_freed t a = t.freed <- a :: List.filteri (fun i _ -> i < 15) t.freed

(* keep 8 to 24 live blocks of 1-8 pages, as the pool allows *)
let refill t rng =
  while List.length t.live < 8 do
    let pages = 1 + Random.State.int rng 8 in
    match t.alloc (pages * ps) with
    | m -> t.live <- (addr m, pages * ps) :: t.live
    | exception e when t.is_oom e -> (
        match t.live with
        | (a, _) :: rest -> t.free (Netsys_mem.grab a 1); remember_freed t a; t.live <- rest
        | [] -> failwith "refill: an empty pool is out of memory")
  done

let prop_free t ~others ~other_maps rng w =
  let m = resolve t ~others ~other_maps w in
  let a = addr m in
  let before = snapshot t in
  let r =
    match t.free m with
    | () -> (
        match List.assoc_opt a t.live with
        | Some sz ->
            tally "free: freed";
            t.live <- List.remove_assoc a t.live;
            remember_freed t a;
            let s = Shmpool.stats t.sp in
            if s.free <> (fst before).free + sz then
              fail "%s: free of a %d-byte block freed %d" t.tname sz (s.free - (fst before).free);
            clean t "free"
        | None -> fail "%s: free succeeded at mapping offset %d, which starts no live block" t.tname (off_in t a))
    | exception e -> (
        match List.assoc_opt a t.live with
        | Some sz ->
            fail "%s: free of a live %d-byte block at offset %d raised %s" t.tname sz (off_in t a) (Printexc.to_string e)
        | None when e = t.free_error -> tally "free: rejected"; unchanged t before "a rejected free"
        | None -> fail "%s: free at offset %d raised %s" t.tname (off_in t a) (Printexc.to_string e))
  in
  refill t rng;
  r

let prop_size t ~others ~other_maps w ~by_addr =
  let a = address_of t ~others ~other_maps w in
  let before = snapshot t in
  let call () = if by_addr then t.size_at_addr a else t.size (resolve t ~others ~other_maps w) in
  let what = if by_addr then "size_at_addr" else "size" in
  (match call () with
   | n -> (
       match List.assoc_opt a t.live with
       | Some sz when n = sz -> tally (what ^ ": found")
       | Some sz -> fail "%s: %s of a %d-byte block says %d" t.tname what sz n
       | None -> fail "%s: %s 0x%nx (offset %d) says %d: no block starts there" t.tname what a (off_in t a) n)
   | exception e -> (
       match (List.assoc_opt a t.live, e) with
       | Some sz, _ -> fail "%s: %s of a live %d-byte block raised %s" t.tname what sz (Printexc.to_string e)
       | None, Not_found -> tally (what ^ ": Not_found")
       | None, _ -> fail "%s: %s 0x%nx raised %s" t.tname what a (Printexc.to_string e)));
  unchanged t before what

let overlaps (a, n) (b, m) = Nativeint.compare a (Nativeint.add b (Nativeint.of_int m)) < 0 && Nativeint.compare b (Nativeint.add a (Nativeint.of_int n)) < 0

let prop_alloc t rng n =
  let before = snapshot t in
  let s = fst before in
  let r =
    match t.alloc n with
    | m ->
        let pages = (n + ps - 1) / ps in
        let a = addr m and len = Array1.dim m in
        if n <= 0 || n > s.payload then fail "%s: alloc %d succeeded" t.tname n;
        if len <> pages * ps then fail "%s: alloc %d gave %d bytes" t.tname n len;
        let off = off_in t a in
        if off < t.pool_start || (off - t.pool_start) mod ps <> 0 || off + len > Array1.dim t.mapping then
          fail "%s: alloc %d returned offset %d" t.tname n off;
        List.iter (fun b -> if overlaps (a, len) b then fail "%s: alloc %d overlaps a live block" t.tname n) t.live;
        if t.size m <> len then fail "%s: size of a fresh block" t.tname;
        tally "alloc: allocated";
        t.live <- (a, len) :: t.live;
        (* keep room *)
        while List.length t.live > 24 || (Shmpool.stats t.sp).free < s.payload / 4 do
          let i = Random.State.int rng (List.length t.live) in
          let a, _ = List.nth t.live i in
          t.free (Netsys_mem.grab a 1);
          remember_freed t a;
          t.live <- List.remove_assoc a t.live
        done;
        clean t "alloc"
    | exception e when e = t.bad_size ->
        if n > 0 then fail "%s: alloc %d: bad size" t.tname n;
        tally "alloc: bad size";
        unchanged t before "alloc of a bad size"
    | exception e when t.is_oom e ->
        if n > 0 && n <= s.payload && (n + ps - 1) / ps * ps <= s.largest_free then
          fail "%s: alloc %d: out of memory with a free run of %d" t.tname n s.largest_free;
        if n <= 0 then fail "%s: alloc %d: out of memory instead of bad size" t.tname n;
        tally "alloc: out of memory";
        unchanged t before "alloc out of memory"
    | exception e -> fail "%s: alloc %d raised %s" t.tname n (Printexc.to_string e)
  in
  refill t rng;
  r

let gen_size payload =
  let open QCheck.Gen in
  frequency
    [
      (2, int);
      (2, int_range (-10) 10);
      (2, int_range 1 (16 * ps));
      (2, int_range (payload - (2 * ps)) (payload + (2 * ps)));
      (1, oneofl [ max_int; min_int; max_int - 1; min_int + 1; 0; -1; payload; payload + 1; 1 lsl 62; 1 lsl 40; 1 lsl 32 ]);
      (1, map (fun k -> (1 lsl k) + ps - 1) (int_bound 61));
      (1, map (fun k -> k * ps) (int_range 1 pool_pages));
    ]

(* ----- the run --------------------------------------------------------------------- *)

let run () =
  let t0 = now () in
  let rng = Random.State.make [| seed |] in
  let name = shm_name "fuzz" in
  let ts = shmpool_target name in
  at_exit (fun () -> try Shmpool.unlink ts.sp with _ -> ());
  let id = M.create_mempool (pool_pages * ps) in
  record_shm (M.shm_name id);
  at_exit (fun () -> try M.unlink_mempool id with _ -> ());
  let tm = mempool_target id in
  (* other pools, with live blocks *)
  let other = Shmpool.create (16 * ps) in
  let other_id = M.create_mempool (16 * ps) in
  record_shm (M.shm_name other_id);
  at_exit (fun () -> try M.unlink_mempool other_id with _ -> ());
  let other_blocks = List.init 3 (fun i -> Shmpool.alloc other ((i + 1) * ps)) in
  let other_mblocks = List.init 3 (fun i -> M.alloc_mem other_id ((i + 1) * ps)) in
  let other_tm = mempool_target other_id in
  let other_map_sp =
    (* the lowest block's address minus the first offset of debug_info's
       allocations gives the mapping's base *)
    let low = List.fold_left min (Shmpool.addr_of (List.hd other_blocks)) (List.map Shmpool.addr_of other_blocks) in
    let base = Nativeint.sub low (Nativeint.of_int (only_block_offset (Shmpool.debug_info other))) in
    Netsys_mem.grab base (Shmpool.stats other).total
  in
  refill ts rng;
  refill tm rng;
  let others_of t = if t == ts then other_blocks @ other_mblocks @ List.map (fun (a, n) -> Netsys_mem.grab a n) tm.live
    else other_blocks @ other_mblocks @ List.map (fun (a, n) -> Netsys_mem.grab a n) ts.live in
  let maps_of t = [ other_map_sp; other_tm.mapping; (if t == ts then tm else ts).mapping ] in
  let where = QCheck.make ~print:show_where gen_where in
  let tests t =
    [
      QCheck.Test.make ~count ~name:(t.tname ^ ": free of arbitrary memory") where (fun w ->
          prop_free t ~others:(others_of t) ~other_maps:(maps_of t) rng w);
      QCheck.Test.make ~count ~name:(t.tname ^ ": size of arbitrary memory") where (fun w ->
          prop_size t ~others:(others_of t) ~other_maps:(maps_of t) w ~by_addr:false);
      QCheck.Test.make ~count ~name:(t.tname ^ ": size_at_addr of arbitrary addresses") where (fun w ->
          prop_size t ~others:(others_of t) ~other_maps:(maps_of t) w ~by_addr:true);
      QCheck.Test.make ~count ~name:(t.tname ^ ": alloc of arbitrary sizes")
        (QCheck.make ~print:string_of_int (gen_size (pool_pages * ps)))
        (fun n -> prop_alloc t rng n);
    ]
  in
  let all = tests ts @ tests tm in
  let out = Filename.temp_file "shmpool-torture-fuzz-" ".out" in
  record_path out;
  at_exit (fun () -> try Sys.remove out with Sys_error _ -> ());
  let oc = open_out out in
  let code =
    QCheck_base_runner.run_tests ~colors:false ~verbose:false ~out:oc
      ~rand:(Random.State.make [| seed |]) all
  in
  close_out oc;
  if code <> 0 then begin
    let ic = open_in out in
    (try while true do prerr_endline (input_line ic) done with End_of_file -> ());
    close_in ic
  end;
  (* the other pools are untouched *)
  let others_ok =
    Shmpool.check other = [] && Shmpool.check (Shmpool_netmcore.shmpool other_id) = []
    && (Shmpool.stats other).live_blocks = 3
    && (Shmpool.stats (Shmpool_netmcore.shmpool other_id)).live_blocks = 3
  in
  if not others_ok then prerr_endline "torture fuzz: the other pools changed";
  let failures = if code = 0 then 0 else 1 in
  let c k = try Hashtbl.find counts k with Not_found -> 0 in
  report ~suite
    "%d properties, %d cases: free %d freed / %d rejected, size %d / %d Not_found, size_at_addr %d / %d Not_found, alloc %d / %d bad size / %d OOM; %s, %d violations (%.1f s, seed %d)"
    (List.length all) (count * List.length all) (c "free: freed") (c "free: rejected") (c "size: found") (c "size: Not_found")
    (c "size_at_addr: found") (c "size_at_addr: Not_found") (c "alloc: allocated") (c "alloc: bad size")
    (c "alloc: out of memory")
    (if code = 0 then "all passed" else "FAILED")
    (failures + if others_ok then 0 else 1)
    (now () -. t0) seed;
  code = 0 && others_ok

let () = main ~suite run
