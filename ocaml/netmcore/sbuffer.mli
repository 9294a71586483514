(* Netmcore_buffer on shmpool (same signature as OCamlnet 4.1.9's);
   exported as [Shmpool_netmcore.Netmcore_buffer], documented there. *)

type 'h buffer
type 'h buffer_descr

val create : Netmcore.res_id -> int -> 'h -> 'h buffer
val destroy : 'h buffer -> unit
val start : 'h buffer -> int
val length : 'h buffer -> int
val contents : 'h buffer -> string
val sub : 'h buffer -> int -> int -> string
val blit_to_bytes : 'h buffer -> int -> Bytes.t -> int -> int -> unit
val blit_to_string : 'h buffer -> int -> Bytes.t -> int -> int -> unit
val blit_to_memory : 'h buffer -> int -> Netsys_mem.memory -> int -> int -> unit
val access : 'h buffer -> int -> (Bytes.t -> int -> int -> 'a) -> 'a
val add_string : 'h buffer -> string -> unit
val add_substring : 'h buffer -> string -> int -> int -> unit
val add_sub_string : 'h buffer -> string -> int -> int -> unit
val add_submemory : 'h buffer -> Netsys_mem.memory -> int -> int -> unit
val add_sub_memory : 'h buffer -> Netsys_mem.memory -> int -> int -> unit
val delete_hd : 'h buffer -> int -> unit
val clear : 'h buffer -> unit
val header : 'h buffer -> 'h
val descr_of_buffer : 'h buffer -> 'h buffer_descr
val buffer_of_descr : Netmcore.res_id -> 'h buffer_descr -> 'h buffer
val heap : _ buffer -> Obj.t Heap.heap
