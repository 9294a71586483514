(* A pipe between two Netmcore worker processes through a Netmcore_buffer:
   a program written the way OCamlnet programs are written, against the
   plain OCamlnet module names. examples/dune builds it twice: as is
   (OCamlnet's modules) and as a copy whose only change is a first line
   [open Shmpool_netmcore] (shmpool's).

   The producer appends a deterministic byte stream to the buffer, the
   consumer reads it (in place with [access], or copied out with [sub] with
   [-copy]) and deletes what it read with [delete_hd]. A Netmcore_buffer
   grows without bound, so the buffer's header carries the flow control: the
   number of bytes written but not yet consumed, an end flag, a mutex, and
   two conditions (room for the producer, data for the consumer). Both ends
   checksum the stream; the first process compares the two. *)

open Printf

type header = {
  mutable pending : int;  (** bytes added and not yet consumed *)
  mutable finished : bool;  (** the producer added its last byte *)
  mutable lock : Netmcore_mutex.mutex;
  mutable room : Netmcore_condition.condition;
  mutable data : Netmcore_condition.condition;
  mutable waiters : Netmcore_condition.wait_set;
}

type descr = header Netmcore_buffer.buffer_descr

let total = ref (32 * 1024 * 1024) (* bytes sent through the pipe *)
let capacity = 65536 (* at most this many bytes wait in the buffer *)
let block_size = 16384 (* the buffer's unit of allocation *)
let copy = ref false

(* The stream: byte k is pattern.[k mod plen] (plen is odd so that the
   pieces the producer adds do not line up with it). *)
let plen = 65521

let pattern =
  let x = ref 12345 in
  String.init plen (fun _ ->
      x := (!x * 1103515245 + 12345) land 0x7fffffff;
      Char.chr ((!x lsr 16) land 0xff))

(* FNV-1a over the stream, on 62 bits *)
let fnv_init = 0x0bf29ce484222325

let fnv h (s : Bytes.t) pos len =
  let h = ref h in
  for k = pos to pos + len - 1 do
    h := (!h lxor Char.code (Bytes.unsafe_get s k)) * 0x100000001b3 land max_int
  done;
  !h

(* The pool is made by the master before Netmcore starts; the workers
   inherit it. *)
let pool = Netmcore_mempool.create_mempool (4 * 1024 * 1024)

let wait_entry b =
  let h = Netmcore_buffer.header b in
  Netmcore_heap.modify (Netmcore_buffer.heap b) (fun mut ->
      Netmcore_condition.alloc_wait_entry mut h.waiters)

let producer ((d : descr), total) =
  let b = Netmcore_buffer.buffer_of_descr pool d in
  let h = Netmcore_buffer.header b in
  let we = wait_entry b in
  let sum = ref fnv_init in
  let sent = ref 0 in
  while !sent < total do
    Netmcore_mutex.lock h.lock;
    while h.pending >= capacity do
      Netmcore_condition.wait we h.room h.lock
    done;
    let room = capacity - h.pending in
    Netmcore_mutex.unlock h.lock;
    let len = min room (total - !sent) in
    (* the piece, in at most two appends around the pattern's end *)
    let rec put k len =
      if len > 0 then begin
        let off = k mod plen in
        let n = min len (plen - off) in
        Netmcore_buffer.add_substring b pattern off n;
        sum := fnv !sum (Bytes.unsafe_of_string pattern) off n;
        put (k + n) (len - n)
      end
    in
    put !sent len;
    sent := !sent + len;
    Netmcore_mutex.lock h.lock;
    h.pending <- h.pending + len;
    h.finished <- !sent = total;
    Netmcore_mutex.unlock h.lock;
    Netmcore_condition.signal h.data
  done;
  !sum

let producer_fork, producer_join = Netmcore_process.def_process producer

let consumer ((d : descr), copy) =
  let b = Netmcore_buffer.buffer_of_descr pool d in
  let h = Netmcore_buffer.header b in
  let we = wait_entry b in
  let sum = ref fnv_init in
  let received = ref 0 in
  let over = ref false in
  while not !over do
    Netmcore_mutex.lock h.lock;
    while h.pending = 0 && not h.finished do
      Netmcore_condition.wait we h.data h.lock
    done;
    let avail = h.pending in
    Netmcore_mutex.unlock h.lock;
    if avail = 0 then over := true
    else begin
      let pos = Netmcore_buffer.start b in
      if copy then begin
        let s = Netmcore_buffer.sub b pos avail in
        sum := fnv !sum (Bytes.unsafe_of_string s) 0 avail
      end
      else begin
        (* in place: [access] gives the rest of one internal block *)
        let k = ref 0 in
        while !k < avail do
          Netmcore_buffer.access b (pos + !k) (fun s p n ->
              let n = min n (avail - !k) in
              sum := fnv !sum s p n;
              k := !k + n)
        done
      end;
      Netmcore_buffer.delete_hd b avail;
      received := !received + avail;
      Netmcore_mutex.lock h.lock;
      h.pending <- h.pending - avail;
      Netmcore_mutex.unlock h.lock;
      Netmcore_condition.signal h.room
    end
  done;
  (!received, !sum)

let consumer_fork, consumer_join = Netmcore_process.def_process consumer

let control (total, copy) =
  (* Mutexes and conditions must be made in shared memory: the header is
     copied in with placeholders, then they are created in place. *)
  let b =
    Netmcore_buffer.create pool block_size
      {
        pending = 0;
        finished = false;
        lock = Netmcore_mutex.dummy ();
        room = Netmcore_condition.dummy_condition ();
        data = Netmcore_condition.dummy_condition ();
        waiters = Netmcore_condition.dummy_wait_set ();
      }
  in
  let h = Netmcore_buffer.header b in
  Netmcore_heap.modify (Netmcore_buffer.heap b) (fun mut ->
      h.lock <- Netmcore_mutex.create mut `Normal;
      h.room <- Netmcore_condition.create_condition mut;
      h.data <- Netmcore_condition.create_condition mut;
      h.waiters <- Netmcore_condition.create_wait_set mut);
  let d = Netmcore_buffer.descr_of_buffer b in
  let t0 = Unix.gettimeofday () in
  let p = Netmcore_process.start ~inherit_resources:`All producer_fork (d, total) in
  let c = Netmcore_process.start ~inherit_resources:`All consumer_fork (d, copy) in
  let sent_sum = Netmcore_process.join producer_join p in
  let got = Netmcore_process.join consumer_join c in
  let dt = Unix.gettimeofday () -. t0 in
  (match (sent_sum, got) with
  | Some s, Some (n, r) ->
      printf "bytes=%d checksum=%x %s\n" n r (if n = total && r = s then "match" else "MISMATCH");
      printf "throughput=%.1f MiB/s\n%!" (float_of_int n /. dt /. 1048576.)
  | _ -> printf "a worker failed\n%!");
  Netmcore_mutex.destroy h.lock;
  Netmcore_condition.destroy_condition h.room;
  Netmcore_condition.destroy_condition h.data;
  Netmcore_condition.destroy_wait_set h.waiters;
  Netmcore_buffer.destroy b

let control_fork, control_join = Netmcore_process.def_process control

let () =
  Arg.parse
    [
      ("-mib", Arg.Int (fun m -> total := m * 1024 * 1024), "<m> MiB sent through the pipe (default 32)");
      ("-copy", Arg.Set copy, " the consumer copies out with sub (default: in place with access)");
    ]
    (fun s -> raise (Arg.Bad ("unexpected argument " ^ s)))
    "usage: pipeline [-mib <m>] [-copy]";
  let dir = Filename.concat (Filename.get_temp_dir_name ()) (sprintf "pipeline.%d" (Unix.getpid ())) in
  let t0 = Unix.gettimeofday () in
  Netmcore.startup ~socket_directory:dir
    ~first_process:(fun () -> Netmcore_process.start ~inherit_resources:`All control_fork (!total, !copy))
    ();
  Netmcore.release pool;
  printf "time=%.3f\n%!" (Unix.gettimeofday () -. t0)
