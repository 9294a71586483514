(** @canonical Shmpool_netmcore.Netmcore_mutex *)

(* Netmcore_mutex on shmpool (OCamlnet 4.1.9's signature plus
   [recoveries]); exported as [Shmpool_netmcore.Netmcore_mutex],
   documented there. *)

type mutex_type = [ `Normal | `Errorcheck | `Recursive ]
type mutex

val dummy : unit -> mutex
val create : Heap.mutator -> mutex_type -> mutex
val lock : mutex -> unit
val unlock : mutex -> unit
val destroy : mutex -> unit

val recoveries : mutex -> int
(** Times the mutex was taken over from an owner that died holding it. *)

(**/**)

val raw : mutex -> string
