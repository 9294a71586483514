(* Netmcore_sem on shmpool (OCamlnet 4.1.9's signature); exported as
   [Shmpool_netmcore.Netmcore_sem], documented there. *)

type semaphore

val dummy : unit -> semaphore
val create : Heap.mutator -> int -> semaphore
val destroy : semaphore -> unit
val getvalue : semaphore -> int
val post : semaphore -> unit
val wait : semaphore -> Netsys_posix.sem_wait_behavior -> unit
