/*
 * Long-run check of the C library: CYCLES times load a model from memory, create a session, denoise one
 * 8x8 measurement (STEPS steps), destroy both; prints the resident memory every REPORT cycles. The curve
 * must stay flat (no leak). Built and run by tools/soak/soak.sh.
 *
 *   soak MODEL CYCLES REPORT STEPS
 */
#include "jointdiff.h"
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

static double rss_mb(void) {
  FILE *f = fopen("/proc/self/statm", "r");
  long pages = 0, resident = 0;
  if (f) {
    if (fscanf(f, "%ld %ld", &pages, &resident) != 2) resident = 0;
    fclose(f);
  }
  return resident * (double)sysconf(_SC_PAGESIZE) / (1024.0 * 1024.0);
}

int main(int argc, char **argv) {
  if (argc != 5) {
    fprintf(stderr, "usage: %s MODEL CYCLES REPORT STEPS\n", argv[0]);
    return 2;
  }
  FILE *f = fopen(argv[1], "rb");
  if (!f) return 1;
  fseek(f, 0, SEEK_END);
  long len = ftell(f);
  fseek(f, 0, SEEK_SET);
  unsigned char *bytes = malloc((size_t)len);
  if (!bytes || fread(bytes, 1, (size_t)len, f) != (size_t)len) return 1;
  fclose(f);
  long cycles = atol(argv[2]), report = atol(argv[3]);
  uint32_t steps = (uint32_t)atol(argv[4]);
  float y[64], x[64];
  for (int i = 0; i < 64; i++) y[i] = 0.25f + 0.5f * (float)(i % 7) / 7.0f;
  printf("cycle rss_mb\n");
  for (long c = 1; c <= cycles; c++) {
    jd_model *m = NULL;
    jd_session *s = NULL;
    if (jd_model_load_buffer(bytes, (size_t)len, &m) != JD_OK || jd_session_create(&s) != JD_OK ||
        jd_session_set_signal_model(s, m) != JD_OK || jd_session_set_noise_gaussian(s, 0.1f, 0.0f) != JD_OK ||
        jd_session_set_steps(s, steps) != JD_OK ||
        jd_denoise(s, y, 1, 1, 8, 8, (uint64_t)c, x, 64, NULL, 0, NULL, 0) != JD_OK) {
      fprintf(stderr, "cycle %ld: %s\n", c, jd_last_error());
      return 1;
    }
    jd_session_destroy(&s);
    jd_model_destroy(&m);
    if (c % report == 0 || c == 1) printf("%ld %.1f\n", c, rss_mb());
  }
  free(bytes);
  return 0;
}
