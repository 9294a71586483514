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
  | Alloc_spare_cached
  | Large_scrubbing
  | Large_give_back
  | Take_back_freed

val all : t list
(** Every point, in the order of the Rust list. *)

val name : t -> string
(** The point's name in the Rust core ([Alloc_unlinked] is ["AllocUnlinked"]). *)

val in_rust : (string * int) list
(** The Rust core's crash points (rust/src/crashpoint.rs), names and
    numbers, in order: the one source [all] must match. *)

val arm : t -> unit
(** The next time this process reaches the point, it stops itself with
    [SIGSTOP] (holding the pool lock).
    @raise Invalid_argument if the Rust core has no such point. *)

val disarm : unit -> unit

val arm_panic : unit -> unit
(** The next call into the Rust core this process makes panics there (a
    stand-in for an internal bug): the call must raise [Failure "<fn>:
    internal error: induced by a test"] and leave the process usable. *)
