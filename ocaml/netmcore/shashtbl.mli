(* Netmcore_hashtbl on shmpool (same signature as OCamlnet 4.1.9's);
   exported as [Shmpool_netmcore.Netmcore_hashtbl], documented there. *)

type ('a, 'b, 'h) t
type ('a, 'b, 'h) t_descr

val create : Netmcore.res_id -> 'h -> ('a, 'b, 'h) t
val clear : ('a, 'b, 'h) t -> unit
val add : ('a, 'b, 'h) t -> 'a -> 'b -> unit
val find_ro : ('a, 'b, 'h) t -> 'a -> 'b
val find_p : ('a, 'b, 'h) t -> 'a -> ('b -> 'r) -> 'r
val find_c : ('a, 'b, 'h) t -> 'a -> 'b
val find_all_ro : ('a, 'b, 'h) t -> 'a -> 'b list
val find_all_p : ('a, 'b, 'h) t -> 'a -> ('b list -> 'r) -> 'r
val find_all_c : ('a, 'b, 'h) t -> 'a -> 'b list
val mem_ro : ('a, 'b, 'h) t -> 'a -> bool
val mem : ('a, 'b, 'h) t -> 'a -> bool
val remove : ('a, 'b, 'h) t -> 'a -> unit
val replace : ('a, 'b, 'h) t -> 'a -> 'b -> unit
val iter : ('a -> 'b -> unit) -> ('a, 'b, 'h) t -> unit
val length : ('a, 'b, 'h) t -> int
val header : ('a, 'b, 'h) t -> 'h
val heap : ('a, 'b, 'h) t -> Obj.t Heap.heap
val descr_of_hashtbl : ('a, 'b, 'h) t -> ('a, 'b, 'h) t_descr
val hashtbl_of_descr : Netmcore.res_id -> ('a, 'b, 'h) t_descr -> ('a, 'b, 'h) t
