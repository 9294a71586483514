(* The crash points of rust/src/crashpoint.rs. Their names and numbers come
   from the Rust list itself (shmpool_ml_crash_points); the variant below is
   there for pattern matching, and tests/ocaml/test_crash_points.ml fails
   unless [all] names exactly the Rust points, in the Rust order. *)
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

let all =
  [ Locked; Alloc_unlinked; Alloc_committed; Alloc_remainder_filed; Free_committed;
    Free_neighbours_unlinked; Free_filed; Before_unlock; Alloc_spare_cached;
    Large_scrubbing; Large_give_back; Take_back_freed ]

(* Spelled as in Rust, so a point is found in the Rust list by its name. *)
let name = function
  | Locked -> "Locked"
  | Alloc_unlinked -> "AllocUnlinked"
  | Alloc_committed -> "AllocCommitted"
  | Alloc_remainder_filed -> "AllocRemainderFiled"
  | Free_committed -> "FreeCommitted"
  | Free_neighbours_unlinked -> "FreeNeighboursUnlinked"
  | Free_filed -> "FreeFiled"
  | Before_unlock -> "BeforeUnlock"
  | Alloc_spare_cached -> "AllocSpareCached"
  | Large_scrubbing -> "LargeScrubbing"
  | Large_give_back -> "LargeGiveBack"
  | Take_back_freed -> "TakeBackFreed"

external rust_points : unit -> (string * int) array option = "shmpool_ml_crash_points"

let in_rust =
  match rust_points () with
  | Some a -> Array.to_list a
  | None -> failwith "Crash_point.in_rust: internal error"

let number p =
  match List.assoc_opt (name p) in_rust with
  | Some n -> n
  | None -> invalid_arg ("Crash_point.number: no crash point " ^ name p ^ " in the Rust core")

external arm_stub : int -> unit = "shmpool_ml_arm_crash_point"

(* The process that next reaches [p] stops itself with SIGSTOP (while
   holding the pool lock for every point). *)
let arm p = arm_stub (number p)
let disarm () = arm_stub 0

external arm_panic_stub : unit -> unit = "shmpool_ml_arm_panic"

(* The next Shmpool stub this process runs panics inside its guard. *)
let arm_panic () = arm_panic_stub ()
