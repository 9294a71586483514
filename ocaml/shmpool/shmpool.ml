(* The hot path (alloc, free, size, stats, addr_of) goes through [@@noalloc]
   stubs on untagged ints that return a byte offset or a negative error code;
   the bigarray is an Array1.sub of the pool's mapping made here, and
   exceptions are raised here (raising from Rust through ocaml-rs leaks GC
   roots). The cold stubs return a code or an option, [None] meaning "see
   [last_code ()] and [last_error ()]". No stub lets a Rust panic through:
   it comes back as the code "internal" (raised as Failure). *)

open Bigarray

type memory = (char, int8_unsigned_elt, c_layout) Array1.t

exception Out_of_pool_memory
exception Not_a_pool of string

type t = {
  h : int;  (** handle in the Rust pool table *)
  mutable mem : memory;
      (** the whole mapping (for [format_in_place]/[attach_in_place]: the
          caller's bigarray); blocks are [Array1.sub]s of it, and it and
          every block keep the mapping alive (see [close]). [close] replaces
          it with an empty array, so that only blocks still in use keep a
          closed pool's memory mapped. *)
  payload : int;  (** payload bytes: larger requests cannot succeed *)
  name : string option;
}

external init : unit -> bool = "shmpool_ml_init"

(* boxroot (GC roots of the Rust side) first: the other stubs need it *)
let () = if not (init ()) then failwith "Shmpool: boxroot_setup failed"

(* The error codes are defined once, in rust/src/error.rs ([code::ALL]);
   look each one up by name so that the two sides cannot disagree. *)
external error_code : string -> int = "shmpool_ml_error_code"

let code name =
  let c = error_code name in
  if c >= 0 then failwith ("Shmpool: the Rust stubs define no error code " ^ name) else c

let error_code = code

let e_oom = code "out_of_memory"
let e_bad_size = code "bad_size"
let e_not_a_block = code "not_a_block"
let e_not_a_pool = code "not_a_pool"
let e_closed = code "closed"
let e_bad_name = code "bad_name"
let () = ignore (code "corrupt", code "io", code "internal")

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

external addr_of : memory -> (nativeint[@unboxed])
  = "shmpool_ml_addr_of_byte" "shmpool_ml_addr_of"
  [@@noalloc]

external last_code : unit -> (int[@untagged])
  = "shmpool_ml_last_code_byte" "shmpool_ml_last_code"
  [@@noalloc]

external last_error_stub : unit -> string option = "shmpool_ml_last_error"
external create_stub : int -> string option -> bool -> int = "shmpool_ml_create"
external attach_stub : string -> int = "shmpool_ml_attach"
external in_place_stub : memory -> int -> int = "shmpool_ml_in_place"
external mapping_stub : int -> memory option = "shmpool_ml_mapping"
external debug_info_stub : int -> string option = "shmpool_ml_debug_info"
external check_stub : int -> string array option = "shmpool_ml_check"

external owners_stub : int -> (int * int * bool * int * int) array option
  = "shmpool_ml_owners"

external reclaim_stub : int -> (int * int * (int * int) array) option
  = "shmpool_ml_reclaim_dead"

external unlink_stub : int -> int = "shmpool_ml_unlink"
external close_stub : int -> unit = "shmpool_ml_close"
external total_stub : int -> int = "shmpool_ml_total_for_payload"
external prefault_stub : string -> int -> int = "shmpool_ml_prefault_name"
external flush_all : unit -> unit = "shmpool_ml_flush_all"

let () =
  Callback.register_exception "Shmpool.Out_of_pool_memory" Out_of_pool_memory;
  (* give this process's cached blocks back at exit (Netmcore workers run
     OCaml's at_exit, then leave with _exit, skipping C's atexit) *)
  at_exit flush_all

let last_error () = match last_error_stub () with Some m -> m | None -> "unknown error"

(* Raise the exception for a failed operation [fn]; the common codes have
   fixed exceptions, the rare ones (and internal errors) carry the Rust
   error's message. *)
let fail fn code =
  if code = e_oom then raise Out_of_pool_memory
  else if code = e_bad_size then invalid_arg (fn ^ ": bad size")
  else if code = e_not_a_block then invalid_arg (fn ^ ": not the start of a live block")
  else if code = e_closed then failwith (fn ^ ": pool is closed")
  else if code = e_bad_name then invalid_arg (fn ^ ": bad shm name")
  else if code = e_not_a_pool then raise (Not_a_pool (last_error ()))
  else failwith (fn ^ ": " ^ last_error ())

(* The result of a cold stub returning an option. *)
let get fn = function Some v -> v | None -> fail fn (last_code ())

let page_size =
  let p = page_size_stub () in
  if p <= 0 then fail "Shmpool.page_size" p else p

(* Page sizes are powers of two: round with a mask, not a division, on the
   alloc path. *)
let () = assert (page_size land (page_size - 1) = 0)
let round_to_pages n = (n + page_size - 1) land lnot (page_size - 1)

let of_handle ?source ?name fn h =
  if h < 0 then fail fn h
  else
    let release_and_fail code = close_stub h; fail fn code in
    let mem =
      match source with
      | Some m -> m
      | None -> ( match mapping_stub h with Some m -> m | None -> release_and_fail (last_code ()))
    in
    let st = Array.make 7 0 in
    let r = stats_fill h st in
    if r < 0 then release_and_fail r;
    { h; mem; payload = st.(3); name }

let create ?name ?(prefault = false) size =
  if size <= 0 then invalid_arg "Shmpool.create: bad size";
  of_handle ?name "Shmpool.create" (create_stub size name prefault)

let attach name = of_handle ~name "Shmpool.attach" (attach_stub name)

let format_in_place ?(zeroed = false) m =
  of_handle ~source:m "Shmpool.format_in_place" (in_place_stub m (if zeroed then 2 else 1))

let attach_in_place m = of_handle ~source:m "Shmpool.attach_in_place" (in_place_stub m 0)

external fork_generation_cell : unit -> (int, int_elt, c_layout) Array1.t option
  = "shmpool_ml_fork_generation_cell"

let fork_cell = get "Shmpool.fork_generation" (fork_generation_cell ())
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

let debug_info t = get "Shmpool.debug_info" (debug_info_stub t.h)
let check t = Array.to_list (get "Shmpool.check" (check_stub t.h))

type owner = { pid : int; alive : bool; pages : int; blocks : int }

let owners t =
  get "Shmpool.owners" (owners_stub t.h)
  |> Array.to_list
  |> List.map (fun (pid, _start, alive, pages, blocks) -> { pid; alive; pages; blocks })

type reclaimed = { blocks_freed : int; pages_freed : int; dead : (int * int) list }

let reclaim_dead t =
  let blocks_freed, pages_freed, dead = get "Shmpool.reclaim_dead" (reclaim_stub t.h) in
  { blocks_freed; pages_freed; dead = Array.to_list dead }

let unlink t =
  let r = unlink_stub t.h in
  if r < 0 then fail "Shmpool.unlink" r

external flush_cache_stub : int -> int = "shmpool_ml_flush_cache"

let flush_cache t =
  let r = flush_cache_stub t.h in
  if r < 0 then fail "Shmpool.flush_cache" r

let flush_caches () = flush_all ()

external set_caching_stub : int -> bool -> int = "shmpool_ml_set_caching"

let set_caching t on =
  let r = set_caching_stub t.h on in
  if r < 0 then fail "Shmpool.set_caching" r

let name t = t.name

(* An empty array, so that a closed [t] keeps no mapping alive. *)
let closed_mem = Array1.create char c_layout 0

let close t =
  t.mem <- closed_mem;
  close_stub t.h

let total_for_payload n =
  let r = if n <= 0 then e_bad_size else total_stub n in
  if r = e_bad_size then invalid_arg "Shmpool.total_for_payload: bad size"
  else if r < 0 then fail "Shmpool.total_for_payload" r
  else r

let prefault_shm ?(len = 0) name =
  let r = prefault_stub name len in
  if r < 0 then fail "Shmpool.prefault_shm" r

let heap_handle t = t.h
