(** Test-only: stop this process between the writes of an alloc or a free. *)

type t =
  | Locked
  | Alloc_unlinked
  | Alloc_committed
  | Alloc_remainder_filed
  | Free_committed
  | Free_neighbours_unlinked
  | Free_filed
  | Before_unlock

val all : t list
val name : t -> string

val arm : t -> unit
(** The next time this process reaches the point, it stops itself with
    [SIGSTOP] (holding the pool lock). *)

val disarm : unit -> unit

val arm_panic : unit -> unit
(** The next call into the Rust core this process makes panics there (a
    stand-in for an internal bug): the call must raise [Failure "<fn>:
    internal error: induced by a test"] and leave the process usable. *)
