/* The supervisor of a torture suite becomes a child subreaper, so the
   workers orphaned when a suite kills their parent are reparented to it
   (and reaped, or killed at the end) rather than to PID 1. */
#include <sys/prctl.h>
#include <caml/mlvalues.h>

value torture_set_subreaper(value unit)
{
  (void)unit;
  return Val_bool(prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0);
}
