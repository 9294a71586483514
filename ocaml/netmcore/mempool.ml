(* The Netmcore_mempool shim: a Netmcore preallocated shm resource (mapped
   by Netmcore at the same address in the master and every worker it forks
   later) with a shmpool formatted inside it. Each process looks a pool up
   once and caches it; the hot path is one comparison against the last pool
   used, then the Shmpool call. *)

exception Out_of_pool_memory = Netmcore_mempool.Out_of_pool_memory

module Debug = struct
  let enable = ref false
  let enable_alloc = ref false
end

(* Registered under the original's names, so that
   [Netlog.Debug.enable_module "Netmcore_mempool"] keeps working after the
   switch. *)
let dlog = Netlog.Debug.mk_dlog "Netmcore_mempool" Debug.enable
let dlog_alloc = Netlog.Debug.mk_dlog "Netmcore_mempool.alloc" Debug.enable_alloc

let () =
  Netlog.Debug.register_module "Netmcore_mempool" Debug.enable;
  Netlog.Debug.register_module "Netmcore_mempool.alloc" Debug.enable_alloc

(* [gen]: the fork generation the entry was looked up in. A worker
   inherits its master's table through fork, but a pool it did not inherit
   (~inherit_resources) is unmapped in it: entries of another generation
   are looked up again through Netmcore, which raises as the original
   does. *)
type entry = {
  pool : Shmpool.t;
  name : string;
  container : Netsys_sem.container;
  gen : int;
  private_address : bool;
      (** mapped by the worker that created it, at an address of its own
          (not the one every other process sees it at) *)
}

let pools : (int, entry) Hashtbl.t = Hashtbl.create 7
let last_id = ref (-1)
let last = ref None
let not_a_pool () = failwith "Netmcore_mempool: this resource is not a pool"

let remember n e =
  Hashtbl.replace pools n e;
  last_id := n;
  last := Some e

(* Like the original, a failed lookup does not release the resource (in
   Netmcore the last release destroys it: a wrong id must not). *)
let lookup_slow (`Resource n as id) =
  let gen = Shmpool.fork_generation () in
  match Hashtbl.find_opt pools n with
  | Some e when e.gen = gen ->
      last_id := n;
      last := Some e;
      e
  | stale -> (
      let res = Netmcore.get_resource id in
      match res#repr with
      | `Posix_shm_preallocated_sc (name, mem, container) ->
          let pool = try Shmpool.attach_in_place mem with Shmpool.Not_a_pool _ -> not_a_pool () in
          (match stale with Some old -> Shmpool.close old.pool | None -> ());
          let e = { pool; name; container; gen; private_address = false } in
          remember n e;
          e
      | _ -> not_a_pool ())

let lookup (`Resource n as id) =
  match !last with
  | Some e when !last_id = n && e.gen = Shmpool.fork_generation () -> e
  | _ -> lookup_slow id

let shmpool id = (lookup id).pool
let at_shared_address id = not (lookup id).private_address

(* Is the caller a Netmcore worker (a Netplex container)? There Netmcore
   creates a preallocated object on the worker's behalf in the master, which
   maps it (as do the workers it starts later with the pool in
   ~inherit_resources), but the calling worker does not get a mapping:
   with the original, every use of the pool in the creating worker fails. *)
let in_worker () =
  match Netplex_cenv.self_obj () with
  | `Container _ -> true
  | `Controller _ -> false
  | exception Not_found -> false

(* Formats the pool from a worker through a mapping of its own, and keeps
   that mapping so that the creating worker can use the pool at once (a
   deliberate difference: the original's creating worker cannot). The pool
   holds offsets only, so working at another address than the master's is
   fine; block addresses seen in this worker are its own, though. *)
let format_in_worker name total =
  let fd = Netsys_posix.shm_open name [ Netsys_posix.SHM_O_RDWR ] 0 in
  let mem =
    Fun.protect ~finally:(fun () -> Unix.close fd) (fun () -> Netsys_mem.memory_map_file fd true total)
  in
  try Shmpool.format_in_place ~zeroed:true mem
  with e ->
    Netsys_mem.memory_unmap_file mem;
    raise e

let create_mempool ?(alloc_really = false) size =
  let bad () = invalid_arg "Netmcore_mempool.create_mempool: bad size" in
  if size <= 0 then bad ();
  let total = try Shmpool.total_for_payload size with Invalid_argument _ -> bad () in
  let (`Resource n as id), name, container =
    Netmcore.create_preallocated_shm_sc ~value_area:true "/mempool" total
  in
  (* Netmcore just created the object (shm_create + ftruncate): all zeros *)
  (try
     (* Reserve the whole object, or at least the pool's own header and page
        descriptors: a full /dev/shm then fails here, not with a SIGBUS in
        whichever process first touches the metadata. *)
     let payload = (size + Shmpool.page_size - 1) / Shmpool.page_size * Shmpool.page_size in
     Shmpool.prefault_shm ?len:(if alloc_really then None else Some (total - payload)) name;
     let private_address = in_worker () in
     let pool =
       if private_address then format_in_worker name total
       else
         match (Netmcore.get_resource id)#repr with
         | `Posix_shm_preallocated_sc (_, mem, _) -> Shmpool.format_in_place ~zeroed:true mem
         | _ -> not_a_pool ()
     in
     remember n { pool; name; container; gen = Shmpool.fork_generation (); private_address }
   with e -> (try Netsys_posix.shm_unlink name with _ -> ()); raise e);
  dlog (Printf.sprintf "create_mempool (id=%d) size=%d shm=%s" n size name);
  id

let log_stats (`Resource n) e =
  let s = Shmpool.stats e.pool in
  dlog_alloc
    (Printf.sprintf "stats (id=%d): total=%d free=%d contiguous=%d" n s.payload s.free
       s.largest_free)

let alloc_mem id size =
  if size <= 0 then invalid_arg "Netmcore_mempool.alloc_mem: bad size";
  let e = lookup id in
  let m = try Shmpool.alloc e.pool size with Shmpool.Out_of_pool_memory -> raise Out_of_pool_memory in
  if !Debug.enable_alloc then begin
    let (`Resource n) = id in
    dlog_alloc
      (Printf.sprintf "alloc (id=%d) size=%d addr=0x%nx" n size (Shmpool.addr_of m));
    log_stats id e
  end;
  m

let free_mem id m =
  let e = lookup id in
  if !Debug.enable_alloc then begin
    let (`Resource n) = id in
    dlog_alloc (Printf.sprintf "free (id=%d) addr=0x%nx" n (Shmpool.addr_of m))
  end;
  (try Shmpool.free e.pool m
   with Invalid_argument _ -> failwith "Netmcore_mempool.free_mem: memory block not found");
  if !Debug.enable_alloc then log_stats id e

let size_mem id m = Shmpool.size (lookup id).pool m
let size_mem_at_addr id a = Shmpool.size_at_addr (lookup id).pool a

let stats id =
  (* total: the size asked for, rounded to pages, as the original; the
     header lives outside it (Shmpool.stats has both) *)
  let s = Shmpool.stats (lookup id).pool in
  (s.payload, s.free, s.largest_free)

let debug_info id = Shmpool.debug_info (lookup id).pool
let shm_name id = (lookup id).name
let sem_container id = (lookup id).container
let unlink_mempool id =
  let e = lookup id in
  Netsys_posix.shm_unlink e.name;
  (* the semaphore container too, as the original *)
  try Netsys_sem.unlink (Netsys_sem.prefix e.container) with _ -> ()
