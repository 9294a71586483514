(** @canonical Shmpool_netmcore.Netmcore_heap *)

(* Shared heaps on a shmpool pool, as OCamlnet 4.1.9's [Netmcore_heap]
   (same signature). Exported as [Shmpool_netmcore.Netmcore_heap]; the
   documentation and the deliberate differences are there. *)

type 'a heap
type 'a descr

val create_heap : Netmcore.res_id -> int -> 'a -> 'a heap
val minimum_size : 'a -> int
val root : 'a heap -> 'a
val descr_of_heap : 'a heap -> 'a descr
val heap_of_descr : Netmcore.res_id -> 'a descr -> 'a heap

type mutator

val modify : 'a heap -> (mutator -> 'r) -> 'r
val add : mutator -> 'a -> 'a
val add_immutable : mutator -> 'a -> 'a
val add_uniform_array : mutator -> int -> 'a -> 'a array
val add_init_array : mutator -> int -> (int -> 'a) -> 'a array
val add_some : mutator -> 'a -> 'a option
val add_string : mutator -> int -> string
val pin : mutator -> 'a -> unit
val copy : 'a -> 'a
val with_value : 'a heap -> (unit -> 'b) -> ('b -> 'c) -> 'c
val with_value_2 : 'a heap -> (unit -> 'b * 'c) -> ('b * 'c -> 'z) -> 'z
val with_value_3 : 'a heap -> (unit -> 'b * 'c * 'd) -> ('b * 'c * 'd -> 'z) -> 'z
val with_value_4 : 'a heap -> (unit -> 'b * 'c * 'd * 'e) -> ('b * 'c * 'd * 'e -> 'z) -> 'z

val with_value_5 :
  'a heap -> (unit -> 'b * 'c * 'd * 'e * 'f) -> ('b * 'c * 'd * 'e * 'f -> 'z) -> 'z

val with_value_n : 'a heap -> (unit -> 'b list) -> ('b list -> 'c) -> 'c
val destroy : 'a heap -> unit
val gc : 'a heap -> unit
val pool : 'a heap -> Netmcore.res_id
val mut_pool : mutator -> Netmcore.res_id
val sem_container : 'a heap -> Netsys_sem.container
val mut_sem_container : mutator -> Netsys_sem.container
val debug_info : 'a heap -> string

module Debug : sig
  val enable : bool ref
end

(**/**)

val modify_repairing : 'a heap -> repair:(mutator -> unit) -> (mutator -> 'r) -> 'r
(* Internal (exported as [Shmpool_netmcore.Heap_internal]): [modify], but
   if the heap was recovered after a holder's death since the structure
   was last repaired, runs [repair] first (idempotent: it recomputes the
   structure's own counters from its contents). *)

type stats = {
  chunks : int;
  heap_words : int;
  free_words : int;
  live_words : int;
  gcs : int;
  recoveries : int;
  pins : int;
}

val stats : 'a heap -> stats
(* Internal: figures of the heap (tests, benchmarks). *)

val contains : mutator -> 'a -> bool
(* Internal: whether the value is a block of the mutator's heap. *)

val block : mutator -> int -> int -> Obj.t
(* Internal: a fresh block of [n] fields and tag [tag] in the mutator's
   heap, every field (), kept alive until modify returns. Fields may only
   receive immediates or values of the same heap (no copy is made):
   for the structures' internal cells (Shashtbl's resize). *)
