(* See Shmpool_netmcore.Netmcore_mempool for the documentation. *)

exception Out_of_pool_memory

val create_mempool : ?alloc_really:bool -> int -> Netmcore.res_id
val alloc_mem : Netmcore.res_id -> int -> Netsys_mem.memory
val size_mem : Netmcore.res_id -> Netsys_mem.memory -> int
val size_mem_at_addr : Netmcore.res_id -> nativeint -> int
val free_mem : Netmcore.res_id -> Netsys_mem.memory -> unit
val stats : Netmcore.res_id -> int * int * int
val debug_info : Netmcore.res_id -> string
val shm_name : Netmcore.res_id -> string
val sem_container : Netmcore.res_id -> Netsys_sem.container
val unlink_mempool : Netmcore.res_id -> unit

module Debug : sig
  val enable : bool ref
  val enable_alloc : bool ref
end

val shmpool : Netmcore.res_id -> Shmpool.t

(** Whether this process sees the pool at the address every process of the
    program sees it at: false only in the worker that created it (which
    maps it itself). Heaps hold addresses: they need true. *)
val at_shared_address : Netmcore.res_id -> bool
