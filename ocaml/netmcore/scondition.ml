(* Netmcore_condition on shmpool (see sync.ml and ocaml_sync_stubs.rs).

   A condition is a string of the shared heap holding a futex sequence
   number (for [wait]) and a list of queued event wait entries (for
   [wait_e]). A [wait] needs no entry of its own, so [wait_entry] is a
   token kept for the signature.

   An event wait entry ([wait_entry_e]) is a string of the heap holding
   the path of its named pipe; its wait set keeps it reachable (the
   condition's list holds only its address), which is why entries are
   allocated and freed through the set. [wait_e] opens the pipe, queues the
   entry, releases the mutex, and returns an engine that waits until the
   pipe is readable and the entry is marked signalled; then it takes the
   mutex and continues with [cont]. [signal] and [broadcast] mark queued
   entries, write a byte into their pipes and only then unlink them (a
   signaller that dies in between leaves the entry queued, for the next
   signal); so a woken waiter unlinks its entry itself if it is still
   queued. *)

type condition = string
type wait_entry = int
type wait_entry_e = string
type wait_set = { mutable entries : wait_entry_e array }

module Debug = struct
  let enable = ref false
end

let dummy_condition () : condition = String.make Sync.cond_bytes '\000'
let dummy_wait_set () : wait_set = { entries = [||] }

let create_condition m : condition =
  let s = Sync.alloc m Sync.cond_bytes in
  let c = Sync.sync_init s 1 0 in
  if c < 0 then Sync.fail_code "Netmcore_condition.create_condition" c;
  s

let create_wait_set m : wait_set = Heap.add m { entries = [||] }
let alloc_wait_entry (_ : Heap.mutator) (_ : wait_set) : wait_entry = 1
let free_wait_entry (_ : Heap.mutator) (_ : wait_set) (_ : wait_entry) = ()

let pipe_name (e : wait_entry_e) =
  String.sub e Sync.entry_hdr (Int32.to_int (String.get_int32_le e (Sync.entry_hdr - 4)))

let alloc_wait_entry_e m (ws : wait_set) (name : string) : wait_entry_e =
  let e = Sync.alloc m (Sync.entry_hdr + String.length name) in
  let c = Sync.entry_init e name in
  if c < 0 then Sync.fail_code "Netmcore_condition.alloc_wait_entry_e" c;
  (* the set's array is what keeps [e] alive; [Heap.add] would copy [e],
     so [e] itself is stored into a fresh heap array *)
  let n = Array.length ws.entries in
  let a = Heap.add_uniform_array m (n + 1) e in
  Array.blit ws.entries 0 a 0 n;
  a.(n) <- e;
  ws.entries <- a;
  e

(* The entry leaves the condition list it may still be queued on (its
   waiter died or gave up without leaving) before the set lets it go: once
   the heap reuses its memory, no list may reach it. *)
let free_wait_entry_e m (ws : wait_set) (e : wait_entry_e) =
  let name = pipe_name e in
  let r = Sync.entry_free e in
  (* an entry freed before is a dummy: freeing it again changes nothing *)
  if r < 0 && r <> Sync.e_dummy then Sync.fail_code "Netmcore_condition.free_wait_entry_e" r;
  let keep = List.filter (fun x -> x != e) (Array.to_list ws.entries) in
  let a = Heap.add_uniform_array m (List.length keep) e in
  List.iteri (fun i x -> a.(i) <- x) keep;
  ws.entries <- a;
  try Unix.unlink name with Unix.Unix_error _ -> ()

let wait (_ : wait_entry) c mx =
  let r = Sync.cond_wait c (Smutex.raw mx) in
  if r < 0 then
    if r = Sync.e_not_owner then failwith "Netmcore_condition.wait: mutex not locked by this thread"
    else if r = Sync.e_not_locked then failwith "Netmcore_condition.wait: mutex not locked"
    else Sync.fail_code "Netmcore_condition.wait" r

let signal c =
  let r = Sync.cond_signal c 0 in
  if r < 0 then Sync.fail_code "Netmcore_condition.signal" r

let broadcast c =
  let r = Sync.cond_signal c 1 in
  if r < 0 then Sync.fail_code "Netmcore_condition.broadcast" r

let drain fd =
  let b = Bytes.create 64 in
  let rec go () = match Unix.read fd b 0 64 with 0 -> () | _ -> go () | exception Unix.Unix_error _ -> () in
  go ()

let wait_e ?debug_name:_ (we : wait_entry_e) (c : condition) (mx : Smutex.mutex) (esys : Unixqueue.event_system)
    (cont : unit -> 'a Uq_engines.engine) : 'a Uq_engines.engine =
  (* read-write: the pipe then always has a writer, so it never reports a
     hang-up, and a signaller's non-blocking open always finds a reader *)
  let fd = Unix.openfile (pipe_name we) [ Unix.O_RDWR; Unix.O_NONBLOCK; Unix.O_CLOEXEC ] 0 in
  drain fd;
  let r = Sync.cond_enqueue c we in
  if r < 0 then begin
    Unix.close fd;
    Sync.fail_code "Netmcore_condition.wait_e" r
  end;
  Commit_point.reached "wait_e:enqueued";
  (match Smutex.unlock mx with
  | () -> ()
  | exception e ->
      ignore (Sync.cond_dequeue c we);
      Unix.close fd;
      raise e);
  let closed = ref false in
  let close () =
    if not !closed then begin
      closed := true;
      Unix.close fd
    end
  in
  let rec ready () =
    let poll = new Uq_engines.poll_engine [ (Unixqueue.Wait_in fd, -1.0) ] esys in
    Uq_engines.seq_engine poll (fun _ ->
        drain fd;
        if Sync.entry_signalled we = 1 then begin
          Commit_point.reached "wait_e:woken";
          (* still queued if the signaller died before unlinking it *)
          ignore (Sync.cond_dequeue c we);
          close ();
          Commit_point.reached "wait_e:dequeued";
          Smutex.lock mx;
          cont ()
        end
        else ready ())
  in
  let eng = ready () in
  (* given up before waking: leave the queue; a signal already taken by
     this entry is passed on, so no other waiter misses it (if its
     signaller died half-way, this may be one signal too many: a spurious
     wake-up, which conditions allow) *)
  let give_up () =
    if not !closed then begin
      close ();
      ignore (Sync.cond_dequeue c we);
      if Sync.entry_signalled we = 1 then ignore (Sync.cond_signal c 0)
    end
  in
  Uq_engines.when_state ~is_aborted:give_up ~is_error:(fun _ -> give_up ()) eng;
  eng

let destroy_condition c = ignore (Sync.sync_destroy c)
let destroy_wait_set (_ : wait_set) = ()
