(* Netmcore_queue on shmpool (same signature as OCamlnet 4.1.9's);
   exported as [Shmpool_netmcore.Netmcore_queue], documented there. *)

type ('e, 'h) squeue
type ('e, 'h) squeue_descr

exception Empty

val create : Netmcore.res_id -> 'h -> ('e, 'h) squeue
val push : 'e -> ('e, 'h) squeue -> unit
val pop_p : ('e, 'h) squeue -> ('e -> 'a) -> 'a
val pop_c : ('e, 'h) squeue -> 'e
val top_p : ('e, 'h) squeue -> ('e -> 'a) -> 'a
val top_c : ('e, 'h) squeue -> 'e
val clear : ('e, 'h) squeue -> unit
val is_empty : ('e, 'h) squeue -> bool
val length : ('e, 'h) squeue -> int
val iter : ('e -> unit) -> ('e, 'h) squeue -> unit
val fold : ('a -> 'e -> 'a) -> 'a -> ('e, 'h) squeue -> 'a
val header : ('e, 'h) squeue -> 'h
val heap : (_, _) squeue -> Obj.t Heap.heap
val descr_of_squeue : ('e, 'h) squeue -> ('e, 'h) squeue_descr
val squeue_of_descr : Netmcore.res_id -> ('e, 'h) squeue_descr -> ('e, 'h) squeue
