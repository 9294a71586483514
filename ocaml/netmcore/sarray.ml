(* Netmcore_array on our heap: the root is a record holding the current
   element array and the header.

   Crash safety: every change of the root is a single store. [set] copies
   the element into the heap first (unreachable until stored), then stores
   it; [grow] builds the whole larger array first, then replaces the root's
   array in one store. A holder killed anywhere leaves either the old or the
   new state, and the heap's recovery reclaims whatever it had copied but
   not yet stored. There is no counter to repair: the length is the
   array's. *)

type ('e, 'h) root = { mutable array : 'e array; header : 'h }
type ('e, 'h) sarray = ('e, 'h) root Heap.heap
type ('e, 'h) sarray_descr = ('e, 'h) root Heap.descr

let create pool a h =
  let r = { array = a; header = h } in
  Heap.create_heap pool (Heap.minimum_size r) r

(* An empty array in the heap first, then the elements in one modify:
   [make] then keeps a single copy of [x] shared by every element. *)
let build pool h fill =
  let r = { array = [||]; header = h } in
  let sa = Heap.create_heap pool (Heap.minimum_size r) r in
  Heap.modify sa (fun m -> (Heap.root sa).array <- fill m);
  sa

let make pool n x h =
  if n < 0 then invalid_arg "Netsys_mem.init_array";
  build pool h (fun m -> Heap.add_uniform_array m n x)

let init pool n f h =
  if n < 0 then invalid_arg "Netsys_mem.init_array";
  build pool h (fun m -> Heap.add_init_array m n f)

let grow sa n x =
  Heap.modify sa (fun m ->
      let r = Heap.root sa in
      let old = r.array in
      let k = Array.length old in
      if n > k then begin
        let a = Heap.add_uniform_array m n x in
        Array.blit old 0 a 0 k;
        Commit_point.reached "array.grow";
        r.array <- a
      end)

let bounds () = invalid_arg "index out of bounds"

let set sa k x =
  Heap.modify sa (fun m ->
      let a = (Heap.root sa).array in
      if k < 0 || k >= Array.length a then bounds ();
      a.(k) <- Heap.add m x)

let get_ro sa k = (Heap.root sa).array.(k)

let get_p sa k f = Heap.with_value sa (fun () -> (Heap.root sa).array.(k)) f

let get_c sa k = Heap.with_value sa (fun () -> Heap.copy (Heap.root sa).array.(k)) Fun.id

let length sa = Array.length (Heap.root sa).array
let header sa = (Heap.root sa).header
let deref sa = (Heap.root sa).array
let heap (sa : ('e, 'h) sarray) : Obj.t Heap.heap = Obj.magic sa
let descr_of_sarray = Heap.descr_of_heap
let sarray_of_descr = Heap.heap_of_descr
