(* Netmcore_condition on shmpool (OCamlnet 4.1.9's signature); exported
   as [Shmpool_netmcore.Netmcore_condition], documented there. *)

type condition
type wait_entry
type wait_entry_e
type wait_set

val dummy_condition : unit -> condition
val dummy_wait_set : unit -> wait_set
val create_condition : Heap.mutator -> condition
val create_wait_set : Heap.mutator -> wait_set
val alloc_wait_entry : Heap.mutator -> wait_set -> wait_entry
val free_wait_entry : Heap.mutator -> wait_set -> wait_entry -> unit
val alloc_wait_entry_e : Heap.mutator -> wait_set -> string -> wait_entry_e
val free_wait_entry_e : Heap.mutator -> wait_set -> wait_entry_e -> unit
val wait : wait_entry -> condition -> Smutex.mutex -> unit

val wait_e :
  ?debug_name:string ->
  wait_entry_e ->
  condition ->
  Smutex.mutex ->
  Unixqueue.event_system ->
  (unit -> 'a Uq_engines.engine) ->
  'a Uq_engines.engine

val signal : condition -> unit
val broadcast : condition -> unit
val pipe_name : wait_entry_e -> string
val destroy_condition : condition -> unit
val destroy_wait_set : wait_set -> unit

module Debug : sig
  val enable : bool ref
end
