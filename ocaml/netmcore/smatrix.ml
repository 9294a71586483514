(* Netmcore_matrix on our heap: the root holds the rows, the second
   dimension and the header.

   Rows of floats are flat float arrays whatever builds them ([create],
   [init] and [make]: the original's [make] builds boxed rows there).

   Crash safety as for Netmcore_array: [set] copies the element in first
   (unreachable until stored), then stores it: one store; the matrix is
   built completely before it is reachable from the root. *)

type ('e, 'h) root = { mutable rows : 'e array array; n2 : int; header : 'h }
type ('e, 'h) sarray2 = ('e, 'h) root Heap.heap
type ('e, 'h) sarray2_descr = ('e, 'h) root Heap.descr

let build pool n2 h fill =
  let r = { rows = [||]; n2; header = h } in
  let sa = Heap.create_heap pool (Heap.minimum_size r) r in
  Heap.modify sa (fun m ->
      let rows = fill m in
      Commit_point.reached "matrix.build";
      (Heap.root sa).rows <- rows);
  sa

let create pool n2 a h = build pool n2 h (fun m -> Heap.add m a)

let check what n1 n2 = if n1 < 0 || n2 < 0 then invalid_arg ("Netmcore_matrix." ^ what)

(* [Heap.add] copies even values already in the heap, so rows are built
   first and then stored into the outer array, and elements shared by
   storing the heap copy itself. *)
let rows_of m n1 row =
  let rows = Heap.add_uniform_array m n1 (Obj.magic 0 : 'e array) in
  for i = 0 to n1 - 1 do
    rows.(i) <- row i
  done;
  rows

let make pool n1 n2 x h =
  check "make" n1 n2;
  build pool n2 h (fun m ->
      if n2 = 0 then rows_of m n1 (fun _ -> [||])
      else
        let r0 = Heap.add_uniform_array m n2 x in
        let c = Obj.repr r0.(0) in
        if Obj.is_block c && Obj.tag c = Obj.double_tag then
          (* flat float rows: the float is stored unboxed in each *)
          rows_of m n1 (fun i -> if i = 0 then r0 else Heap.add_uniform_array m n2 x)
        else
          (* one copy of [x], shared by every element *)
          rows_of m n1 (fun i ->
              if i = 0 then r0
              else
                let r = Heap.add_uniform_array m n2 (Obj.magic 0) in
                Array.fill r 0 n2 (Obj.obj c);
                r))

let init pool n1 n2 f h =
  check "init" n1 n2;
  build pool n2 h (fun m -> rows_of m n1 (fun i -> Heap.add_init_array m n2 (fun j -> f i j)))

let set sa k1 k2 x =
  Heap.modify sa (fun m ->
      let rows = (Heap.root sa).rows in
      if k1 < 0 || k1 >= Array.length rows then invalid_arg "index out of bounds";
      let row = rows.(k1) in
      if k2 < 0 || k2 >= Array.length row then invalid_arg "index out of bounds";
      row.(k2) <- Heap.add m x)

let get_ro sa k1 k2 = (Heap.root sa).rows.(k1).(k2)
let get_p sa k1 k2 f = Heap.with_value sa (fun () -> (Heap.root sa).rows.(k1).(k2)) f
let get_c sa k1 k2 = Heap.with_value sa (fun () -> Heap.copy (Heap.root sa).rows.(k1).(k2)) Fun.id

let dim sa =
  let r = Heap.root sa in
  (Array.length r.rows, r.n2)

let header sa = (Heap.root sa).header
let deref sa = (Heap.root sa).rows
let heap (sa : ('e, 'h) sarray2) : Obj.t Heap.heap = Obj.magic sa
let descr_of_sarray2 = Heap.descr_of_heap
let sarray2_of_descr = Heap.heap_of_descr
