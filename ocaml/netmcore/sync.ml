(* Netmcore_mutex, Netmcore_sem and Netmcore_condition on shmpool: each
   object is a string allocated in a shared heap (it never moves), which
   rust/src/ocaml_sync_stubs.rs uses as a robust process-shared pthread
   mutex (`Errorcheck, `Recursive), or as a futex-based binary semaphore
   (`Normal), semaphore or condition. Stubs that may wait
   (they release the runtime lock meanwhile) are not [noalloc]. *)

external mutex_init : string -> int -> int = "shmpool_sync_mutex_init" [@@noalloc]
external mutex_lock : string -> int = "shmpool_sync_mutex_lock"
external mutex_unlock : string -> int = "shmpool_sync_mutex_unlock" [@@noalloc]
external mutex_recoveries : string -> int = "shmpool_sync_mutex_recoveries" [@@noalloc]
external sync_init : string -> int -> int -> int = "shmpool_sync_init" [@@noalloc]
external sync_destroy : string -> int = "shmpool_sync_destroy" [@@noalloc]
external sem_post : string -> int = "shmpool_sync_sem_post" [@@noalloc]
external sem_wait : string -> int -> int = "shmpool_sync_sem_wait"
external sem_getvalue : string -> int = "shmpool_sync_sem_getvalue" [@@noalloc]
external cond_wait : string -> string -> int = "shmpool_sync_cond_wait"
external cond_signal : string -> int -> int = "shmpool_sync_cond_signal"
external sync_bytes : int -> int = "shmpool_sync_bytes" [@@noalloc]
external entry_init : string -> string -> int = "shmpool_sync_entry_init" [@@noalloc]
external cond_enqueue : string -> string -> int = "shmpool_sync_cond_enqueue"
external cond_dequeue : string -> string -> int = "shmpool_sync_cond_dequeue"
external entry_signalled : string -> int = "shmpool_sync_entry_signalled" [@@noalloc]
external entry_free : string -> int = "shmpool_sync_entry_free"

let e_dummy = -1
let e_deadlock = -2
let e_not_owner = -3
let e_again = -4
let e_overflow = -6
let e_not_locked = -7
let mutex_bytes = sync_bytes 0
let sem_bytes = sync_bytes 1
let cond_bytes = sync_bytes 2
let entry_hdr = sync_bytes 3

let fail_code what c =
  if c = e_dummy then failwith (what ^ ": dummy or destroyed object")
  else if c = e_overflow then raise (Unix.Unix_error (Unix.EINVAL, what, ""))
  else failwith (Printf.sprintf "%s: error %d" what c)

(* A fresh object string in the mutator's heap (immutable contents as far
   as OCaml knows: only the stubs write it). *)
let alloc m n = Heap.add_string m n

external test_crash_at : int -> int = "shmpool_sync_test_crash_at" [@@noalloc]
external test_set_holder : string -> int -> int -> int = "shmpool_sync_test_set_holder"

(* Test-only: the process SIGKILLs itself at the point named (see
   ocaml_sync_stubs.rs); "" disarms. *)
let crash_at = function
  | "" -> ignore (test_crash_at 0)
  | "signal:marked" -> ignore (test_crash_at 1)
  | "signal:written" -> ignore (test_crash_at 2)
  | "cond:list-locked" -> ignore (test_crash_at 3)
  | "cond:dequeue-locked" -> ignore (test_crash_at 4)
  | "wait:counted" -> ignore (test_crash_at 5)
  | "wait:woken" -> ignore (test_crash_at 6)
  | p -> invalid_arg ("Struct_internal.sync_crash_at: " ^ p)
