(* Netmcore_condition on shmpool: a futex sequence number in a string of
   the shared heap (see sync.ml); a waiter needs no entry of its own, so
   wait sets and entries are tokens kept for the signature. *)

type condition = string
type wait_entry = int
type wait_entry_e = string
type wait_set = int

module Debug = struct
  let enable = ref false
end

let dummy_condition () : condition = String.make Sync.sem_bytes '\000'
let dummy_wait_set () : wait_set = 0

let create_condition m : condition =
  let s = Sync.alloc m Sync.sem_bytes in
  let c = Sync.sync_init s 1 0 in
  if c < 0 then Sync.fail_code "Netmcore_condition.create_condition" c;
  s

let create_wait_set (_ : Heap.mutator) : wait_set = 1
let alloc_wait_entry (_ : Heap.mutator) (_ : wait_set) : wait_entry = 1
let free_wait_entry (_ : Heap.mutator) (_ : wait_set) (_ : wait_entry) = ()
let alloc_wait_entry_e m (_ : wait_set) (name : string) : wait_entry_e = Heap.add m name
let free_wait_entry_e (_ : Heap.mutator) (_ : wait_set) (_ : wait_entry_e) = ()
let pipe_name (e : wait_entry_e) = e

let wait (_ : wait_entry) c mx =
  let r = Sync.cond_wait c (Smutex.raw mx) in
  if r < 0 then
    if r = Sync.e_not_owner then failwith "Netmcore_condition.wait: mutex not locked by this thread"
    else Sync.fail_code "Netmcore_condition.wait" r

let wait_e ?debug_name:_ (_ : wait_entry_e) (_ : condition) (_ : Smutex.mutex) (_ : Unixqueue.event_system)
    (_ : unit -> 'a Uq_engines.engine) : 'a Uq_engines.engine =
  failwith "Netmcore_condition.wait_e: not supported by shmpool"

let signal c =
  let r = Sync.cond_signal c 0 in
  if r < 0 then Sync.fail_code "Netmcore_condition.signal" r

let broadcast c =
  let r = Sync.cond_signal c 1 in
  if r < 0 then Sync.fail_code "Netmcore_condition.broadcast" r

let destroy_condition c = ignore (Sync.sync_destroy c)
let destroy_wait_set (_ : wait_set) = ()
