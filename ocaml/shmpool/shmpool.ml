(* The hot path (alloc, free, size, stats) goes through [@@noalloc] stubs on
   untagged ints that return a byte offset or a negative error code; the
   bigarray is an Array1.sub of the pool's mapping made here, and exceptions
   are raised here (raising from Rust through ocaml-rs leaks GC roots). *)

open Bigarray

type memory = (char, int8_unsigned_elt, c_layout) Array1.t

exception Out_of_pool_memory
exception Not_a_pool of string

type t = {
  h : int;  (** handle in the Rust pool table *)
  mem : memory;  (** the whole mapping (unmanaged: never freed by the GC) *)
  payload : int;  (** payload bytes: larger requests cannot succeed *)
  source : memory option;
      (** for [format_in_place]/[attach_in_place]: the caller's bigarray,
          kept reachable so that a GC-managed mapping (e.g. from
          [Unix.map_file]) is not unmapped under the pool *)
}

(* Error codes of rust/src/error.rs and rust/src/ocaml_stubs.rs *)
let e_oom = -1
let e_bad_size = -2
let e_not_a_block = -3
let e_not_a_pool = -4
let e_closed = -7

external init : unit -> bool = "shmpool_ml_init"
external page_size_stub : unit -> int = "shmpool_ml_page_size"

external alloc_off : (int[@untagged]) -> (int[@untagged]) -> (int[@untagged])
  = "shmpool_ml_alloc_byte" "shmpool_ml_alloc"
  [@@noalloc]

external free_mem : (int[@untagged]) -> memory -> (int[@untagged])
  = "shmpool_ml_free_byte" "shmpool_ml_free"
  [@@noalloc]

external size_mem : (int[@untagged]) -> memory -> (int[@untagged])
  = "shmpool_ml_size_byte" "shmpool_ml_size"
  [@@noalloc]

external size_addr : (int[@untagged]) -> (nativeint[@unboxed]) -> (int[@untagged])
  = "shmpool_ml_size_at_addr_byte" "shmpool_ml_size_at_addr"
  [@@noalloc]

external stats_fill : (int[@untagged]) -> int array -> (int[@untagged])
  = "shmpool_ml_stats_byte" "shmpool_ml_stats"
  [@@noalloc]

external create_stub : int -> string option -> bool -> int * string = "shmpool_ml_create"
external attach_stub : string -> int * string = "shmpool_ml_attach"
external in_place_stub : memory -> int -> int * string = "shmpool_ml_in_place"
external mapping_stub : int -> memory = "shmpool_ml_mapping"
external last_error : unit -> string = "shmpool_ml_last_error"
external debug_info_stub : int -> string = "shmpool_ml_debug_info"
external check_stub : int -> string array = "shmpool_ml_check"

external owners_stub : int -> int * (int * int * bool * int * int) array
  = "shmpool_ml_owners"

external reclaim_stub : int -> int * int * int * (int * int) array
  = "shmpool_ml_reclaim_dead"

external unlink_stub : int -> int * string = "shmpool_ml_unlink"
external name_stub : int -> string option = "shmpool_ml_name"
external close_stub : int -> unit = "shmpool_ml_close"
external total_stub : int -> int = "shmpool_ml_total_for_payload"
external prefault_stub : string -> int -> int * string = "shmpool_ml_prefault_name"

external flush_all : unit -> unit = "shmpool_ml_flush_all"

let () =
  Callback.register_exception "Shmpool.Out_of_pool_memory" Out_of_pool_memory;
  if not (init ()) then failwith "Shmpool: boxroot_setup failed";
  (* give this process's cached blocks back at exit (Netmcore workers run
     OCaml's at_exit, then leave with _exit, skipping C's atexit) *)
  at_exit flush_all

let page_size = page_size_stub ()

(* Page sizes are powers of two: round with a mask, not a division, on the
   alloc path. *)
let () = assert (page_size land (page_size - 1) = 0)
let round_to_pages n = (n + page_size - 1) land lnot (page_size - 1)

(* Raise the exception for a failed operation [fn]; the common codes have
   fixed exceptions, the rare ones carry the Rust error's message. *)
let fail fn code =
  if code = e_oom then raise Out_of_pool_memory
  else if code = e_bad_size then invalid_arg (fn ^ ": bad size")
  else if code = e_not_a_block then invalid_arg (fn ^ ": not the start of a live block")
  else if code = e_closed then failwith (fn ^ ": pool is closed")
  else if code = e_not_a_pool then raise (Not_a_pool (last_error ()))
  else failwith (fn ^ ": " ^ last_error ())

let of_handle ?source fn (code, msg) =
  if code < 0 then
    if code = e_not_a_pool then raise (Not_a_pool msg)
    else if code = e_bad_size then invalid_arg (fn ^ ": bad size")
    else failwith (fn ^ ": " ^ msg)
  else
    let mem = mapping_stub code in
    let st = Array.make 7 0 in
    ignore (stats_fill code st);
    { h = code; mem; payload = st.(3); source }

let create ?name ?(prefault = false) size =
  if size <= 0 then invalid_arg "Shmpool.create: bad size";
  of_handle "Shmpool.create" (create_stub size name prefault)

let attach name = of_handle "Shmpool.attach" (attach_stub name)
let format_in_place ?(zeroed = false) m =
  of_handle ~source:m "Shmpool.format_in_place" (in_place_stub m (if zeroed then 2 else 1))

let attach_in_place m = of_handle ~source:m "Shmpool.attach_in_place" (in_place_stub m 0)

external fork_generation_cell : unit -> (int, int_elt, c_layout) Array1.t
  = "shmpool_ml_fork_generation_cell"

let fork_cell = fork_generation_cell ()
let fork_generation () = Array1.unsafe_get fork_cell 0

let alloc t n =
  if n <= 0 then invalid_arg "Shmpool.alloc: bad size";
  if n > t.payload then raise Out_of_pool_memory;
  let off = alloc_off t.h n in
  if off >= 0 then Array1.sub t.mem off (round_to_pages n)
  else fail "Shmpool.alloc" off

let free t m =
  let r = free_mem t.h m in
  if r < 0 then fail "Shmpool.free" r

let size t m =
  let r = size_mem t.h m in
  if r >= 0 then r else if r = e_not_a_block then raise Not_found else fail "Shmpool.size" r

let size_at_addr t a =
  let r = size_addr t.h a in
  if r >= 0 then r
  else if r = e_not_a_block then raise Not_found
  else fail "Shmpool.size_at_addr" r

type stats = {
  total : int;
  free : int;
  largest_free : int;
  payload : int;
  live_blocks : int;
  page_size : int;
  recoveries : int;
}

let stats t =
  let a = Array.make 7 0 in
  let r = stats_fill t.h a in
  if r < 0 then fail "Shmpool.stats" r;
  {
    total = a.(0);
    free = a.(1);
    largest_free = a.(2);
    payload = a.(3);
    live_blocks = a.(4);
    page_size = a.(5);
    recoveries = a.(6);
  }

let debug_info t = debug_info_stub t.h
let check t = Array.to_list (check_stub t.h)

type owner = { pid : int; alive : bool; pages : int; blocks : int }

let owners t =
  let code, a = owners_stub t.h in
  if code < 0 then fail "Shmpool.owners" code;
  Array.to_list a
  |> List.map (fun (pid, _start, alive, pages, blocks) -> { pid; alive; pages; blocks })

type reclaimed = { blocks_freed : int; pages_freed : int; dead : (int * int) list }

let reclaim_dead t =
  let code, blocks_freed, pages_freed, dead = reclaim_stub t.h in
  if code < 0 then fail "Shmpool.reclaim_dead" code;
  { blocks_freed; pages_freed; dead = Array.to_list dead }

let unlink t =
  let code, msg = unlink_stub t.h in
  if code < 0 then failwith ("Shmpool.unlink: " ^ msg)

external flush_cache_stub : int -> int = "shmpool_ml_flush_cache"

let flush_cache t =
  let r = flush_cache_stub t.h in
  if r < 0 then fail "Shmpool.flush_cache" r

let flush_caches () = flush_all ()

external set_caching_stub : int -> bool -> int = "shmpool_ml_set_caching"

let set_caching t on =
  let r = set_caching_stub t.h on in
  if r < 0 then fail "Shmpool.set_caching" r

let name t = name_stub t.h
let close t = close_stub t.h

external addr_of_stub : memory -> nativeint = "shmpool_ml_addr_of"

let addr_of m = addr_of_stub m

let total_for_payload n =
  let r = if n <= 0 then e_bad_size else total_stub n in
  if r < 0 then invalid_arg "Shmpool.total_for_payload: bad size" else r

let prefault_shm ?(len = 0) name =
  let code, msg = prefault_stub name len in
  if code < 0 then failwith ("Shmpool.prefault_shm: " ^ msg)
