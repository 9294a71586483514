(* Netmcore_sem on shmpool: a futex-based counter in a string of the
   shared heap (see sync.ml). *)

type semaphore = string

let dummy () : semaphore = String.make Sync.sem_bytes '\000'

let create m v : semaphore =
  if v < 0 then invalid_arg "Netmcore_sem.create";
  let s = Sync.alloc m Sync.sem_bytes in
  let c = Sync.sync_init s 0 v in
  if c < 0 then Sync.fail_code "sem_init" c;
  s

let destroy s = ignore (Sync.sync_destroy s)

let getvalue s =
  let c = Sync.sem_getvalue s in
  if c < 0 then Sync.fail_code "Netmcore_sem.getvalue" c;
  c

let post s =
  let c = Sync.sem_post s in
  if c < 0 then Sync.fail_code "Netmcore_sem.post" c

let wait s (b : Netsys_posix.sem_wait_behavior) =
  let c = Sync.sem_wait s (match b with Netsys_posix.SEM_WAIT_BLOCK -> 0 | Netsys_posix.SEM_WAIT_NONBLOCK -> 1) in
  if c < 0 then
    if c = Sync.e_again then raise (Unix.Unix_error (Unix.EAGAIN, "sem_trywait", ""))
    else Sync.fail_code "Netmcore_sem.wait" c
