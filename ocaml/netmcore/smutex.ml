(* Netmcore_mutex on shmpool, in a string of the shared heap (see
   sync.ml): a [`Normal] mutex is a binary semaphore (no owner: any thread
   of any process may unlock it, as OCamlnet's); [`Errorcheck] and
   [`Recursive] ones are robust process-shared pthread mutexes, owned by
   threads. A mutex whose holder died (even by SIGKILL) is taken over by
   the next locker: its [lock] succeeds, and [recoveries] counts such
   takeovers. *)

type mutex_type = [ `Normal | `Errorcheck | `Recursive ]
type mutex = string

let dummy () : mutex = String.make Sync.mutex_bytes '\000'

let create m (t : mutex_type) : mutex =
  let s = Sync.alloc m Sync.mutex_bytes in
  let c = Sync.mutex_init s (match t with `Normal -> 0 | `Errorcheck -> 1 | `Recursive -> 2) in
  if c < 0 then Sync.fail_code "Netmcore_mutex.create" c;
  s

let lock mx =
  let c = Sync.mutex_lock mx in
  if c < 0 then
    if c = Sync.e_dummy then failwith "Netmcore_mutex.lock: dummy mutex"
    else if c = Sync.e_deadlock then failwith "Netmcore_mutex.lock: already locked by this process"
    else Sync.fail_code "Netmcore_mutex.lock" c

let unlock mx =
  let c = Sync.mutex_unlock mx in
  if c < 0 then
    if c = Sync.e_dummy then failwith "Netmcore_mutex.unlock: dummy mutex"
    else if c = Sync.e_not_owner then failwith "Netmcore_mutex.unlock: not locked by this process"
    else if c = Sync.e_not_locked then failwith "Netmcore_mutex.unlock: not locked"
    else Sync.fail_code "Netmcore_mutex.unlock" c

let destroy mx = ignore (Sync.sync_destroy mx)

let recoveries mx =
  let c = Sync.mutex_recoveries mx in
  if c < 0 then failwith "Netmcore_mutex.recoveries: dummy mutex";
  c
let raw (m : mutex) : string = m
