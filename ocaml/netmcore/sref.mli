(* Shared references, as OCamlnet 4.1.9's [Netmcore_ref] (same signature),
   on {!Heap}. Exported as [Shmpool_netmcore.Netmcore_ref]. *)

type 't sref
type 't sref_descr

val sref : Netmcore.res_id -> 't -> 't sref
val assign : 't sref -> 't -> unit
val deref_ro : 't sref -> 't
val deref_p : 't sref -> ('t -> 'a) -> 'a
val deref_c : 't sref -> 't
val heap : 't sref -> Obj.t Heap.heap
val descr_of_sref : 't sref -> 't sref_descr
val sref_of_descr : Netmcore.res_id -> 't sref_descr -> 't sref
