(* Part 2 of `make demo`: a parallel word-frequency count, written the way
   OCamlnet programs are written, against the plain OCamlnet module names.
   demo/dune builds it twice: as is (OCamlnet's netmulticore) and as a copy
   whose only change is a first line [open Shmpool_netmcore] (shmpool's).

   The first process generates a corpus of documents (words drawn from a
   skewed vocabulary by a fixed pseudo-random sequence) and pushes them as
   jobs into a Netmcore_queue. Workers pop documents until the queue is
   empty, count each one's words privately, and add the counts into one
   shared Netmcore_hashtbl (a Netmcore_mutex in the table's header makes
   "read the count, store the sum" atomic). Each worker reports how many
   documents and words it did through a shared array in a Netmcore_ref.
   The first process then checks the shared table against a sequential
   count of the same corpus and prints a digest of the result, so that the
   two builds' outputs can be compared. *)

open Printf

let docs = ref 600
let words_per_doc = ref 1000
let workers = ref 2
let vocabulary = 5000

(* The word of rank [k]: a pronounceable string, distinct for each k. *)
let word k =
  let syll = [| "ka"; "lo"; "mi"; "nu"; "pe"; "ra"; "si"; "to"; "vu"; "ze" |] in
  let b = Buffer.create 12 in
  let rec go k =
    Buffer.add_string b syll.(k mod 10);
    if k >= 10 then go (k / 10)
  in
  go k;
  Buffer.contents b

(* Document [d]: words drawn with a skew towards low ranks (the square of a
   uniform number), separated by spaces and sometimes a line break. *)
let document d =
  let b = Buffer.create (!words_per_doc * 8) in
  let x = ref (d * 7919 + 1) in
  for i = 1 to !words_per_doc do
    x := (!x * 1103515245 + 12345) land 0x3fffffff;
    let u = float_of_int (!x lsr 6) /. float_of_int (1 lsl 24) in
    Buffer.add_string b (word (int_of_float (u *. u *. float_of_int vocabulary)));
    Buffer.add_char b (if i mod 12 = 0 then '\n' else ' ')
  done;
  Buffer.contents b

(* The words of a text, counted privately. *)
let count_words text =
  let local = Hashtbl.create 1024 in
  let add w = Hashtbl.replace local w (1 + try Hashtbl.find local w with Not_found -> 0) in
  let start = ref 0 in
  String.iteri
    (fun i c ->
      if c = ' ' || c = '\n' then begin
        if i > !start then add (String.sub text !start (i - !start));
        start := i + 1
      end)
    text;
  if String.length text > !start then add (String.sub text !start (String.length text - !start));
  local

type header = { mutable lock : Netmcore_mutex.mutex }
type jobs = (string, unit) Netmcore_queue.squeue_descr
type counts = (string, int, header) Netmcore_hashtbl.t_descr
type reports = (int * int) array Netmcore_ref.sref_descr

let worker (pool, (jd : jobs), (cd : counts), (rd : reports), w) =
  let q = Netmcore_queue.squeue_of_descr pool jd in
  let ht = Netmcore_hashtbl.hashtbl_of_descr pool cd in
  let h = Netmcore_hashtbl.header ht in
  let r = Netmcore_ref.sref_of_descr pool rd in
  let ndocs = ref 0 and nwords = ref 0 in
  (try
     while true do
       let text = Netmcore_queue.pop_c q in
       incr ndocs;
       Hashtbl.iter
         (fun word n ->
           nwords := !nwords + n;
           Netmcore_mutex.lock h.lock;
           (match Netmcore_hashtbl.find_ro ht word with
           | m -> Netmcore_hashtbl.replace ht word (m + n)
           | exception Not_found -> Netmcore_hashtbl.add ht word n);
           Netmcore_mutex.unlock h.lock)
         (count_words text)
     done
   with Netmcore_queue.Empty -> ());
  (* the report: a new pair in this worker's slot of the shared array *)
  Netmcore_heap.modify (Netmcore_ref.heap r) (fun mut ->
      (Netmcore_ref.deref_ro r).(w) <- Netmcore_heap.add mut (!ndocs, !nwords))

let worker_fork, worker_join = Netmcore_process.def_process worker

let main pool =
  let corpus = Array.init !docs document in
  let t0 = Unix.gettimeofday () in
  let q = Netmcore_queue.create pool () in
  Array.iter (fun text -> Netmcore_queue.push text q) corpus;
  let ht = Netmcore_hashtbl.create pool { lock = Netmcore_mutex.dummy () } in
  Netmcore_heap.modify (Netmcore_hashtbl.heap ht) (fun mut ->
      (Netmcore_hashtbl.header ht).lock <- Netmcore_mutex.create mut `Normal);
  let r = Netmcore_ref.sref pool (Array.make !workers (0, 0)) in
  let arg w =
    ( pool,
      Netmcore_queue.descr_of_squeue q,
      Netmcore_hashtbl.descr_of_hashtbl ht,
      Netmcore_ref.descr_of_sref r,
      w )
  in
  let pids =
    List.init !workers (fun w -> Netmcore_process.start ~inherit_resources:`All worker_fork (arg w))
  in
  List.iter
    (fun pid -> if Netmcore_process.join worker_join pid = None then failwith "a worker failed")
    pids;
  let elapsed = Unix.gettimeofday () -. t0 in
  (* the result, read back from shared memory *)
  let shared = ref [] in
  Netmcore_hashtbl.iter (fun w n -> shared := (w, n) :: !shared) ht;
  let by_count (w1, n1) (w2, n2) = if n1 <> n2 then compare n2 n1 else compare w1 w2 in
  let shared = List.sort by_count !shared in
  let reports = Netmcore_ref.deref_c r in
  (* the reference: the same corpus counted in this process *)
  let whole = Hashtbl.create 8192 in
  Array.iter
    (fun text ->
      Hashtbl.iter
        (fun w n -> Hashtbl.replace whole w (n + try Hashtbl.find whole w with Not_found -> 0))
        (count_words text))
    corpus;
  let expected = List.sort by_count (Hashtbl.fold (fun w n acc -> (w, n) :: acc) whole []) in
  let total = List.fold_left (fun acc (_, n) -> acc + n) 0 shared in
  let reported_docs = Array.fold_left (fun acc (d, _) -> acc + d) 0 reports in
  let reported_words = Array.fold_left (fun acc (_, n) -> acc + n) 0 reports in
  let text = String.concat "\n" (List.map (fun (w, n) -> sprintf "%s %d" w n) shared) in
  printf "documents=%d words=%d distinct=%d\n" !docs total (List.length shared);
  printf "top: %s\n"
    (String.concat ", "
       (List.map (fun (w, n) -> sprintf "%s %d" w n) (List.filteri (fun i _ -> i < 5) shared)));
  printf "digest=%s\n" (Digest.to_hex (Digest.string text));
  printf "verified=%b\n"
    (shared = expected && reported_docs = !docs && reported_words = total
    && Netmcore_queue.length q = 0);
  printf "per worker (documents, words):%s\n"
    (String.concat "" (Array.to_list (Array.map (fun (d, n) -> sprintf " (%d, %d)" d n) reports)));
  printf "time=%.3f\n%!" elapsed

let main_fork, main_join = Netmcore_process.def_process main

let () =
  Arg.parse
    [
      ("-docs", Arg.Set_int docs, "<n> documents (default 600)");
      ("-words", Arg.Set_int words_per_doc, "<n> words per document (default 1000)");
      ("-workers", Arg.Set_int workers, "<n> worker processes (default 2)");
    ]
    (fun s -> raise (Arg.Bad ("unexpected argument " ^ s)))
    "usage: wordfreq [-docs <n>] [-words <n>] [-workers <n>]";
  let pool = Netmcore_mempool.create_mempool (256 * 1024 * 1024) in
  let dir = Filename.concat (Filename.get_temp_dir_name ()) (sprintf "wordfreq.%d" (Unix.getpid ())) in
  Netmcore.startup ~socket_directory:dir
    ~first_process:(fun () -> Netmcore_process.start ~inherit_resources:`All main_fork pool)
    ();
  Netmcore.release pool
