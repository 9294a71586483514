(* Netmcore_heap on shmpool: the OCaml half of rust/src/heap (design:
   docs/design-heap.md). A heap value is a small private record naming the
   pool and the heap's descriptor (its offset in the pool), so it can be
   marshalled to another worker; the Rust handle of the heap is looked up
   per process and cached in the record. *)

external last_error : unit -> string option = "shmpool_ml_last_error"
external h_create : int -> int -> 'a -> int = "shmpool_heap_create"
external h_open : int -> int -> int = "shmpool_heap_open"
external h_lock : int -> int = "shmpool_heap_lock"
external h_unlock : int -> int = "shmpool_heap_unlock" [@@noalloc]
external h_add : int -> 'a -> bool -> 'a = "shmpool_heap_add" [@@noalloc]
external h_alloc_block : int -> int -> int -> Obj.t = "shmpool_heap_alloc_block" [@@noalloc]
external h_alloc_string : int -> int -> string = "shmpool_heap_alloc_string" [@@noalloc]
external h_root : int -> 'a = "shmpool_heap_root" [@@noalloc]
external h_keep : int -> 'a -> int = "shmpool_heap_keep" [@@noalloc]
external h_collect : int -> int = "shmpool_heap_collect" [@@noalloc]
external h_pin : int -> 'a -> int = "shmpool_heap_pin" [@@noalloc]
external h_unpin : int -> int -> int = "shmpool_heap_unpin" [@@noalloc]
external h_contains : int -> 'a -> int = "shmpool_heap_contains" [@@noalloc]
external h_measure : 'a -> int = "shmpool_heap_measure" [@@noalloc]
external h_first_block_bytes : int -> int = "shmpool_heap_first_block_bytes" [@@noalloc]
external h_destroy : int -> int = "shmpool_heap_destroy"
external h_debug_info : int -> string = "shmpool_heap_debug_info"
external h_last_code : unit -> int = "shmpool_heap_last_code" [@@noalloc]
external h_repair_needed : int -> int = "shmpool_heap_repair_gen" [@@noalloc]
external h_repaired : int -> int = "shmpool_heap_repaired" [@@noalloc]
(* waits for the heap lock with the runtime lock released: may allocate *)
external h_stats : int -> int array = "shmpool_heap_stats"

let code = Shmpool.error_code

let e_oom = code "out_of_memory"
let e_bad_size = code "bad_size"
let e_uncopyable = code "uncopyable"
let e_not_a_heap = code "not_a_heap"
let e_destroyed = code "heap_destroyed"
let e_not_locked = code "not_locked"

module Debug = struct
  let enable = ref false
end

let dlog = Netlog.Debug.mk_dlog "Netmcore_heap" Debug.enable
let () = Netlog.Debug.register_module "Netmcore_heap" Debug.enable
let init_value_failure () = failwith "Netsys_mem.init_value: Library error"
let no_heap () = failwith "Netmcore_heap.heap_of_descr: no heap structure found at this address"

(* The exception of a negative code, as the original raises it. *)
let raise_code c =
  if c = e_oom then raise Mempool.Out_of_pool_memory
  else if c = e_uncopyable then init_value_failure ()
  else if c = e_bad_size then invalid_arg "Netmcore_mempool.alloc_mem: bad size"
  else if c = e_destroyed then failwith "Netmcore_heap: heap destroyed"
  else if c = e_not_a_heap then no_heap ()
  else if c = e_not_locked then failwith "Netmcore_heap: the heap is not locked by this thread"
  else
    failwith
      ("Netmcore_heap: " ^ match last_error () with Some s -> s | None -> string_of_int c)

let check_code c = if c < 0 then raise_code c

(* A value stub's result: a block, or an immediate that is either the
   copy (a forced lazy of an int) or a failure recorded in the last code. *)
let checked (v : 'a) : 'a =
  if Obj.is_block (Obj.repr v) then v
  else
    let c = h_last_code () in
    if c < 0 then raise_code c else v

(* This process's pid, read again after each fork only. *)
let my_pid =
  let gen = ref (-1) and pid = ref 0 in
  fun () ->
    let g = Shmpool.fork_generation () in
    if g <> !gen then begin
      pid := Unix.getpid ();
      gen := g
    end;
    !pid

type 'a heap = {
  pool : Netmcore.res_id;
  descr : int;
  nonce : int;  (* tells this heap from a later one at the same descr *)
  (* cache: [pid * max_handles + hh], the Rust handle [hh] valid in process
     [pid] only (a record may be marshalled to another process, or copied
     into a heap and used by several at once: one word, so that no
     process ever reads another's handle with its own pid); -1: none *)
  mutable cache : int;
}

(* Handles per process (MAX_HEAPS of ocaml_heap_stubs.rs). *)
let max_handles = 1 lsl 14

type 'a descr = int

(* (pool id, descriptor) -> (handle, pid of the process that opened it).
   A forked worker inherits the table but opens the heap again, on the
   pool as its own Mempool lookup attached it (a handle keeps the pool
   object it was opened on). *)
let handles : (int * int, int * int) Hashtbl.t = Hashtbl.create 7

let pool_handle id = Shmpool.heap_handle (Mempool.shmpool id)

(* !roots.(hh): the root of heap handle hh in this process, read once (a
   heap's root value never changes after create_heap: modifications go
   into its fields), so [root] is two loads as with the original; 0 once
   this process destroyed the heap. *)
let roots : Obj.t array ref = ref [||]

(* The root of the heap used last, by nonce (see [root] below). *)
let last_nonce_ref = ref (-1)
let last_root_ref = ref (Obj.repr 0)

let cache_root hh =
  let r = checked (h_root hh) in
  if hh >= Array.length !roots then begin
    let a = Array.make (max 8 (2 * (hh + 1))) (Obj.repr 0) in
    Array.blit !roots 0 a 0 (Array.length !roots);
    roots := a
  end;
  !roots.(hh) <- r

(* The nonce of the heap handle [hh] was opened on (not of whatever heap
   is at its descriptor now). *)
external h_nonce : int -> int = "shmpool_heap_nonce"

(* Whether handle [hh] is on a live heap and, when [h]'s nonce is known,
   on the heap [h] names. A heap destroyed and replaced by another at the
   same descriptor leaves a cached handle that answers Destroyed. *)
let usable h hh =
  (h.nonce < 0 || h_nonce hh = h.nonce)
  && match checked (h_root hh) with _ -> true | exception Failure _ -> false

(* Forgets a cached handle whose heap is gone: its cached root too, so
   [root] of a record naming that heap fails instead of reading freed
   memory. *)
let forget n descr hh =
  Hashtbl.remove handles (n, descr);
  if hh < Array.length !roots then begin
    if !roots.(hh) == !last_root_ref then last_nonce_ref := -1;
    !roots.(hh) <- Obj.repr 0
  end

let handle h =
  let c = h.cache in
  if c >= 0 && c / max_handles = my_pid () then c mod max_handles
  else begin
    let (`Resource n) = h.pool in
    let hh =
      match Hashtbl.find_opt handles (n, h.descr) with
      | Some (hh, pid) when pid = my_pid () && usable h hh -> hh
      | cached ->
          (* none yet, or one on a heap destroyed since (maybe replaced by
             another at the same descriptor): open once more *)
          (match cached with Some (old, pid) when pid = my_pid () -> forget n h.descr old | _ -> ());
          let hh = h_open (pool_handle h.pool) h.descr in
          if hh < 0 then if hh = e_destroyed then raise_code hh else no_heap ();
          cache_root hh;
          Hashtbl.replace handles (n, h.descr) (hh, my_pid ());
          (* another heap than the record's, which is gone *)
          if h.nonce >= 0 && h_nonce hh <> h.nonce then raise_code e_destroyed;
          hh
    in
    h.cache <- (my_pid () * max_handles) + hh;
    hh
  end

let make pool descr hh =
  let (`Resource n) = pool in
  cache_root hh;
  Hashtbl.replace handles (n, descr) (hh, my_pid ());
  { pool; descr; nonce = h_nonce hh; cache = (my_pid () * max_handles) + hh }

external h_descr : int -> int = "shmpool_heap_descr"

(* A heap holds addresses, valid only where the pool is mapped at the
   address every process sees it at: not in the worker that created the
   pool (see Mempool.create_mempool). *)
let require_shared_address fn pool =
  if not (Mempool.at_shared_address pool) then
    failwith
      (fn
     ^ ": this worker created the pool and maps it at an address of its own; use heaps on it from \
        the master or from workers started later")

let create_heap pool size (root : 'a) : 'a heap =
  require_shared_address "Netmcore_heap.create_heap" pool;
  if Obj.is_int (Obj.repr root) then
    failwith "Netmcore_heap.create_heap: the root element is not a block";
  if size <= 0 then invalid_arg "Netmcore_mempool.alloc_mem: bad size";
  let hh = h_create (pool_handle pool) size root in
  check_code hh;
  let d = h_descr hh in
  check_code d;
  dlog (Printf.sprintf "create_heap descr=%d size=%d" d size);
  make pool d hh

let minimum_size v =
  if Obj.is_int (Obj.repr v) then h_first_block_bytes 0
  else
    let w = h_measure v in
    check_code w;
    h_first_block_bytes w

(* The root of the heap used last (in this process or, inherited through
   fork, its parent: values are at the same address in every worker), by
   nonce: [root] on the same heap is then two loads and a comparison. *)
let last_nonce = last_nonce_ref
let last_root = last_root_ref

let root_slow h =
  (* [handle] first: opening the heap here may grow [roots], so the table
     is read only after it (an argument order left to the compiler read
     the old, shorter table) *)
  let hh = handle h in
  let r = Array.unsafe_get !roots hh in
  if Obj.is_int r then failwith "Netmcore_heap: heap destroyed";
  last_root := r;
  last_nonce := h.nonce;
  r

let root h = Obj.obj (if h.nonce = !last_nonce then !last_root else root_slow h)
let descr_of_heap h = h.descr

let heap_of_descr pool (d : 'a descr) : 'a heap =
  require_shared_address "Netmcore_heap.heap_of_descr" pool;
  let h = { pool; descr = d; nonce = -1; cache = -1 } in
  (* [handle] checks a cached handle is on a live heap *)
  let hh = try handle h with Failure _ -> no_heap () in
  { h with nonce = h_nonce hh }

type mutator = { mhh : int; mpool : Netmcore.res_id; mutable alive : bool }

external h_escape : int -> int array -> int = "shmpool_heap_escape"

(* Debug: after a modify (under the lock again), log the first field of the heap that points into
   this process's private memory (a program error: other processes would
   read garbage there). O(live data). *)
let check_escape hh =
  let out = [| 0 |] in
  (* its own lock, taken after modify's: nothing allocates while held *)
  let c = h_lock hh in
  let k = if c >= 0 then h_escape hh out else 0 in
  if c >= 0 then ignore (h_unlock hh);
  if k > 0 then
    dlog
      (Printf.sprintf
         "modify stored a private value into the heap: field %d of the block at 0x%x"
         (k - 1) (out.(0) * 2))

let modify_with h before f =
  let hh = handle h in
  let m = { mhh = hh; mpool = h.pool; alive = true } in
  (* The lock is taken inside the handler, and [locked] records it, so an
     exception at any point unlocks exactly when the lock was taken. *)
  let locked = ref false in
  match
    let c = h_lock hh in
    (* no allocation, hence no poll point, between the lock and this *)
    if c >= 0 then locked := true;
    check_code c;
    if c = 1 then dlog "recovered the heap after a holder's death";
    before m;
    f m
  with
  | r ->
      m.alive <- false;
      (* unlock first: the check allocates, and may fail *)
      ignore (h_unlock hh);
      if !Debug.enable then check_escape hh;
      r
  | exception e ->
      m.alive <- false;
      if !locked then ignore (h_unlock hh);
      raise e

let modify h f = modify_with h ignore f

let modify_repairing h ~repair f =
  modify_with h
    (fun m ->
      if h_repair_needed m.mhh = 1 then begin
        repair m;
        check_code (h_repaired m.mhh)
      end)
    f

let live m what = if not m.alive then failwith ("Netmcore_heap." ^ what ^ ": invalid mutator")

let add_gen what share m (v : 'a) : 'a =
  live m what;
  if Obj.is_int (Obj.repr v) then v else checked (h_add m.mhh v share)

let add m v = add_gen "add" false m v
let add_immutable m v = add_gen "add_immutable" true m v

let block m n tag = checked (h_alloc_block m.mhh n tag)

let add_uniform_array m n (x : 'a) : 'a array =
  live m "add_uniform_array";
  if n < 0 then invalid_arg "Netmcore_heap.add_uniform_array";
  if n = 0 then [||]
  else
    let c = add m x in
    let r = Obj.repr c in
    if Obj.is_block r && Obj.tag r = Obj.double_tag then begin
      let a : float array = Obj.obj (block m n Obj.double_array_tag) in
      let f : float = Obj.obj r in
      Array.fill a 0 n f;
      Obj.magic a
    end
    else begin
      let a = block m n 0 in
      for i = 0 to n - 1 do
        Obj.set_field a i r
      done;
      Obj.obj a
    end

let add_init_array m n (f : int -> 'a) : 'a array =
  live m "add_init_array";
  if n < 0 then invalid_arg "Netmcore_heap.add_init_array";
  if n = 0 then [||]
  else
    let x0 = f 0 in
    let r0 = Obj.repr x0 in
    (* as in [add_some]: [x0] is read after the array's allocation *)
    if Obj.is_block r0 then check_code (h_keep m.mhh x0);
    if Obj.is_block r0 && Obj.tag r0 = Obj.double_tag then begin
      (* filled with 0.0; rooted until modify returns *)
      let a : float array = Obj.obj (block m n Obj.double_array_tag) in
      a.(0) <- Obj.obj r0;
      for i = 1 to n - 1 do
        a.(i) <- Obj.obj (Obj.repr (f i))
      done;
      Obj.magic a
    end
    else begin
      (* filled with (); rooted until modify returns *)
      let a = block m n 0 in
      Obj.set_field a 0 (Obj.repr (add m x0));
      for i = 1 to n - 1 do
        Obj.set_field a i (Obj.repr (add m (f i)))
      done;
      Obj.obj a
    end

let add_some m (x : 'a) : 'a option =
  live m "add_some";
  (* [x] may be a heap value reachable from nothing but the caller (moved
     out of its place in this modify): the GC the block's allocation may
     run must keep it *)
  if Obj.is_block (Obj.repr x) then check_code (h_keep m.mhh x);
  let b = block m 1 0 in
  Obj.set_field b 0 (Obj.repr x);
  Obj.obj b

let add_string m n =
  live m "add_string";
  if n < 0 then invalid_arg "Netmcore_heap.add_string";
  checked (h_alloc_string m.mhh n)

let pin m x =
  live m "pin";
  if Obj.is_block (Obj.repr x) then check_code (h_keep m.mhh x)

let contains m x =
  live m "contains";
  Obj.is_block (Obj.repr x)
  &&
  let c = h_contains m.mhh x in
  check_code c;
  c = 1

let copy (v : 'a) : 'a =
  if Obj.is_int (Obj.repr v) then v
  else
    match Marshal.to_bytes v [] with
    | b -> Marshal.from_bytes b 0
    | exception (Invalid_argument _ | Failure _) -> failwith "Netsys_mem.copy_value: Library error"

(* Pins the blocks of this heap among [xs] for this process until
   [unpin_all]: they stay roots while [process] runs without the lock.
   Others (private values, which the minor GC may move) need no pin. *)
let with_pins h (find : unit -> 'b) (blocks : 'b -> Obj.t list) (process : 'b -> 'c) : 'c =
  let hh = handle h in
  let pinned = ref [] in
  let x =
    modify h (fun _ ->
        let x = find () in
        (* Pins are heap blocks: the pool may run out after some of them
           were taken. Those must go at once (still under the lock), as
           nothing else releases the pins of a live process. *)
        (try
           List.iter
             (fun v ->
               if Obj.is_block v then begin
                 (* 0: not a block of this heap, nothing pinned *)
                 let i = h_pin hh v in
                 check_code i;
                 if i > 0 then pinned := i :: !pinned
               end)
             (blocks x)
         with e ->
           List.iter (fun i -> ignore (h_unpin hh i)) !pinned;
           pinned := [];
           raise e);
        x)
  in
  (* [process] may have destroyed the heap: nothing to unpin then *)
  let unpin_all () =
    if !pinned <> [] then
      try modify h (fun _ -> List.iter (fun i -> ignore (h_unpin hh i)) !pinned)
      with Failure _ -> ()
  in
  Fun.protect ~finally:unpin_all (fun () -> process x)

let with_value h find process = with_pins h find (fun x -> [ Obj.repr x ]) process

let with_value_2 h find process =
  with_pins h find (fun (a, b) -> [ Obj.repr a; Obj.repr b ]) process

let with_value_3 h find process =
  with_pins h find (fun (a, b, c) -> [ Obj.repr a; Obj.repr b; Obj.repr c ]) process

let with_value_4 h find process =
  with_pins h find (fun (a, b, c, d) -> [ Obj.repr a; Obj.repr b; Obj.repr c; Obj.repr d ]) process

let with_value_5 h find process =
  with_pins h find
    (fun (a, b, c, d, e) -> [ Obj.repr a; Obj.repr b; Obj.repr c; Obj.repr d; Obj.repr e ])
    process

let with_value_n h find process = with_pins h find (List.map Obj.repr) process

let destroy h =
  let hh = try handle h with Failure _ -> failwith "Netmcore_mempool.free_mem: memory block not found" in
  let c = h_destroy hh in
  if c >= 0 || c = e_destroyed then begin
    !roots.(hh) <- Obj.repr 0;
    (let (`Resource n) = h.pool in
     Hashtbl.remove handles (n, h.descr));
    if !last_nonce = h.nonce then last_nonce := -1
  end;
  if c = e_destroyed || c = e_not_a_heap then
    failwith "Netmcore_mempool.free_mem: memory block not found";
  check_code c;
  dlog (Printf.sprintf "destroy descr=%d" h.descr)

let gc h =
  let hh = handle h in
  modify h (fun _ -> check_code (h_collect hh))

let pool h = h.pool
let mut_pool m = m.mpool
let sem_container h = Mempool.sem_container h.pool
let mut_sem_container m = Mempool.sem_container m.mpool
let debug_info h = h_debug_info (handle h)

type stats = {
  chunks : int;
  heap_words : int;
  free_words : int;
  live_words : int;
  gcs : int;
  recoveries : int;
  pins : int;
}

let stats h =
  let a = h_stats (handle h) in
  if Array.length a < 7 then raise_code (if Array.length a = 1 then a.(0) else -1);
  {
    chunks = a.(0);
    heap_words = a.(1);
    free_words = a.(2);
    live_words = a.(3);
    gcs = a.(4);
    recoveries = a.(5);
    pins = a.(6);
  }
