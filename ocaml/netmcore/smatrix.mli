(* Netmcore_matrix on shmpool (same signature as OCamlnet 4.1.9's);
   exported as [Shmpool_netmcore.Netmcore_matrix], documented there. *)

type ('e, 'h) sarray2
type ('e, 'h) sarray2_descr

val create : Netmcore.res_id -> int -> 'e array array -> 'h -> ('e, 'h) sarray2
val make : Netmcore.res_id -> int -> int -> 'e -> 'h -> ('e, 'h) sarray2
val init : Netmcore.res_id -> int -> int -> (int -> int -> 'e) -> 'h -> ('e, 'h) sarray2
val set : ('e, _) sarray2 -> int -> int -> 'e -> unit
val get_ro : ('e, _) sarray2 -> int -> int -> 'e
val get_p : ('e, _) sarray2 -> int -> int -> ('e -> 'a) -> 'a
val get_c : ('e, _) sarray2 -> int -> int -> 'e
val dim : (_, _) sarray2 -> int * int
val header : (_, 'h) sarray2 -> 'h
val deref : ('e, _) sarray2 -> 'e array array
val heap : (_, _) sarray2 -> Obj.t Heap.heap
val descr_of_sarray2 : ('e, 'h) sarray2 -> ('e, 'h) sarray2_descr
val sarray2_of_descr : Netmcore.res_id -> ('e, 'h) sarray2_descr -> ('e, 'h) sarray2
