(* Netmcore_ref on shmpool: a heap whose root is a ref cell. *)

type 't sref = 't ref Heap.heap
type 't sref_descr = 't ref Heap.descr

let sref pool x =
  let r = ref x in
  Heap.create_heap pool (Heap.minimum_size r) r

let assign sr x = Heap.modify sr (fun m -> Heap.root sr := Heap.add m x)
let deref_ro sr = !(Heap.root sr)
let deref_p sr f = Heap.with_value sr (fun () -> !(Heap.root sr)) f
let deref_c sr = Heap.with_value sr (fun () -> !(Heap.root sr)) Heap.copy
let heap (sr : 't sref) : Obj.t Heap.heap = Obj.magic sr
let descr_of_sref = Heap.descr_of_heap
let sref_of_descr = Heap.heap_of_descr
