(* The crash points of rust/src/crashpoint.rs, in their order. *)
type t =
  | Locked
  | Alloc_unlinked
  | Alloc_committed
  | Alloc_remainder_filed
  | Free_committed
  | Free_neighbours_unlinked
  | Free_filed
  | Before_unlock

let all =
  [ Locked; Alloc_unlinked; Alloc_committed; Alloc_remainder_filed; Free_committed;
    Free_neighbours_unlinked; Free_filed; Before_unlock ]

let number = function
  | Locked -> 1
  | Alloc_unlinked -> 2
  | Alloc_committed -> 3
  | Alloc_remainder_filed -> 4
  | Free_committed -> 5
  | Free_neighbours_unlinked -> 6
  | Free_filed -> 7
  | Before_unlock -> 8

let name = function
  | Locked -> "Locked"
  | Alloc_unlinked -> "Alloc_unlinked"
  | Alloc_committed -> "Alloc_committed"
  | Alloc_remainder_filed -> "Alloc_remainder_filed"
  | Free_committed -> "Free_committed"
  | Free_neighbours_unlinked -> "Free_neighbours_unlinked"
  | Free_filed -> "Free_filed"
  | Before_unlock -> "Before_unlock"

external arm_stub : int -> unit = "shmpool_ml_arm_crash_point"

(* The process that next reaches [p] stops itself with SIGSTOP (while
   holding the pool lock for every point). *)
let arm p = arm_stub (number p)
let disarm () = arm_stub 0

external arm_panic_stub : unit -> unit = "shmpool_ml_arm_panic"

(* The next Shmpool stub this process runs panics inside its guard. *)
let arm_panic () = arm_panic_stub ()
