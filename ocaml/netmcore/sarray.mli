(* Netmcore_array on shmpool (same signature as OCamlnet 4.1.9's);
   exported as [Shmpool_netmcore.Netmcore_array], documented there. *)

type ('e, 'h) sarray
type ('e, 'h) sarray_descr

val create : Netmcore.res_id -> 'e array -> 'h -> ('e, 'h) sarray
val make : Netmcore.res_id -> int -> 'e -> 'h -> ('e, 'h) sarray
val init : Netmcore.res_id -> int -> (int -> 'e) -> 'h -> ('e, 'h) sarray
val grow : ('e, _) sarray -> int -> 'e -> unit
val set : ('e, _) sarray -> int -> 'e -> unit
val get_ro : ('e, _) sarray -> int -> 'e
val get_p : ('e, _) sarray -> int -> ('e -> 'a) -> 'a
val get_c : ('e, _) sarray -> int -> 'e
val length : (_, _) sarray -> int
val header : (_, 'h) sarray -> 'h
val deref : ('e, _) sarray -> 'e array
val heap : (_, _) sarray -> Obj.t Heap.heap
val descr_of_sarray : ('e, 'h) sarray -> ('e, 'h) sarray_descr
val sarray_of_descr : Netmcore.res_id -> ('e, 'h) sarray_descr -> ('e, 'h) sarray
