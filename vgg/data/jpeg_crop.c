/* Decode one rectangle of a JPEG file with libjpeg-turbo, skipping the IDCT and colour conversion of
 * everything outside it (jpeg_crop_scanline, jpeg_skip_scanlines) and stopping after its last row.
 * vgg/data/jpeg.py compiles this file on first use and calls it through ctypes (issue 16: the training
 * transform only needs the crop box of each image, paper §3.1).
 *
 * At the left and right edges of a cropped region libjpeg-turbo's fancy (smooth) chroma upsampling
 * sees different neighbours than in a full decode, which moves a few pixels by 1-4 grey levels. So the
 * rectangle is widened by MARGIN_X pixels on each side (the upsampler reaches one chroma sample, 2
 * pixels, past an edge) and cut out afterwards, and starts MARGIN_Y rows early (libjpeg-turbo's skip
 * keeps the upsampler's context rows itself; 2 rows more cost nothing): the pixels returned are those
 * of a full decode (tests/test_crop_decode.py checks this). Ad hoc, on 7,920 random boxes of 66 files
 * (4:2:0, 4:2:2, 4:4:4, progressive), margins 2 and 4 wide gave no pixel different from PIL's full decode,
 * margin 0 3,641 boxes; 0 rows above gave none either. Each 16 px less of margin is ~1.5 % less work.
 */
#include <setjmp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <jpeglib.h>

#define MARGIN_X 4
#define MARGIN_Y 2
#define CHUNK 16 /* rows asked of libjpeg per call: an iMCU row at most (8 or 16) */

struct error_handler {
    struct jpeg_error_mgr mgr;
    jmp_buf jump;
    char *message;
    int message_size;
};

static void on_error(j_common_ptr cinfo) {
    struct error_handler *handler = (struct error_handler *)cinfo->err;
    (*cinfo->err->format_message)(cinfo, handler->message);
    longjmp(handler->jump, 1);
}

/* Warnings (corrupt data, premature end of file) are errors here: a damaged file is skipped, as the
 * full decoders skip it, rather than trained on with grey filling. */
static void on_message(j_common_ptr cinfo, int level) {
    if (level < 0) on_error(cinfo);
}

/* libjpeg's errors and warnings go to `handler`, its message into `message`; the caller sets its jump. */
static void use_handler(struct jpeg_decompress_struct *cinfo, struct error_handler *handler, char *message) {
    cinfo->err = jpeg_std_error(&handler->mgr);
    handler->mgr.error_exit = on_error;
    handler->mgr.emit_message = on_message;
    handler->message = message;
}

/* The header of a JPEG file: out[0] its height, out[1] its width, out[2] its number of colour components.
 * Returns 0, or -1 with a message (JMSG_LENGTH_MAX bytes). Lets the training transform draw its crop
 * without PIL parsing the file (issue 16: PIL's Python marker parser cost ~5 % of a training sample). */
int vgg_jpeg_header(const unsigned char *data, unsigned long size, int *out, char *message) {
    struct jpeg_decompress_struct cinfo;
    struct error_handler handler;
    use_handler(&cinfo, &handler, message);
    if (setjmp(handler.jump)) {
        jpeg_destroy_decompress(&cinfo);
        return -1;
    }
    jpeg_create_decompress(&cinfo);
    jpeg_mem_src(&cinfo, data, size);
    jpeg_read_header(&cinfo, TRUE);
    out[0] = (int)cinfo.image_height;
    out[1] = (int)cinfo.image_width;
    out[2] = cinfo.num_components;
    jpeg_destroy_decompress(&cinfo);
    return 0;
}

/* Whether a JPEG file's entropy-coded data is whole: 0, or -1 with a message (JMSG_LENGTH_MAX bytes).
 * A file cut short but ending in an end-of-image marker decodes without an error: libjpeg only warns
 * ("premature end of data segment") and fills the rest grey, and PIL and TorchCodec pass that warning
 * by. This reads all of its coefficients (entropy decoding only: no IDCT, no colour conversion), so that
 * warning, and any other, makes the file unreadable for the decoders that cannot tell (issue 29). */
int vgg_jpeg_check(const unsigned char *data, unsigned long size, char *message) {
    struct jpeg_decompress_struct cinfo;
    struct error_handler handler;
    use_handler(&cinfo, &handler, message);
    if (setjmp(handler.jump)) {
        jpeg_destroy_decompress(&cinfo);
        return -1;
    }
    jpeg_create_decompress(&cinfo);
    jpeg_mem_src(&cinfo, data, size);
    jpeg_read_header(&cinfo, TRUE);
    jpeg_read_coefficients(&cinfo);
    jpeg_destroy_decompress(&cinfo);
    return 0;
}

/* Rows [top, top + height) and columns [left, left + width) of the full-size RGB decode, into `out`
 * (height x width x 3 bytes, row-major). Returns 0, or -1 with a message (JMSG_LENGTH_MAX bytes). */
int vgg_jpeg_decode_crop(const unsigned char *data, unsigned long size, int top, int left, int height,
                         int width, unsigned char *out, char *message) {
    struct jpeg_decompress_struct cinfo;
    struct error_handler handler;
    unsigned char *volatile rows_buffer = NULL;
    use_handler(&cinfo, &handler, message);
    if (setjmp(handler.jump)) {
        free(rows_buffer);
        jpeg_destroy_decompress(&cinfo);
        return -1;
    }
    jpeg_create_decompress(&cinfo);
    jpeg_mem_src(&cinfo, data, size);
    jpeg_read_header(&cinfo, TRUE);
    cinfo.out_color_space = JCS_RGB;
    jpeg_start_decompress(&cinfo);
    int image_w = (int)cinfo.output_width, image_h = (int)cinfo.output_height;
    if (top < 0 || left < 0 || height < 1 || width < 1 || top + height > image_h || left + width > image_w) {
        snprintf(message, JMSG_LENGTH_MAX, "crop %dx%d at (%d, %d) outside the %dx%d image", width, height, left,
                 top, image_w, image_h);
        jpeg_destroy_decompress(&cinfo);
        return -1;
    }
    int x0 = left > MARGIN_X ? left - MARGIN_X : 0;
    int x1 = left + width + MARGIN_X < image_w ? left + width + MARGIN_X : image_w;
    int y0 = top > MARGIN_Y ? top - MARGIN_Y : 0;
    JDIMENSION crop_x = (JDIMENSION)x0, crop_w = (JDIMENSION)(x1 - x0);
    jpeg_crop_scanline(&cinfo, &crop_x, &crop_w);  /* widened to iMCU boundaries: crop_x <= x0 */
    /* CHUNK rows a call rather than one: libjpeg-turbo's per-call bookkeeping made one-row reads about 5 %
     * slower (0.94 vs 0.90 ms a box at S=256 on the bench/transforms.py files; the whole training
     * transform 2.4 % faster; ad-hoc timings of 2026-11-25, interleaved, CPU time). */
    rows_buffer = malloc((size_t)crop_w * 3 * CHUNK);
    if (rows_buffer == NULL) {
        snprintf(message, JMSG_LENGTH_MAX, "out of memory");
        jpeg_destroy_decompress(&cinfo);
        return -1;
    }
    JSAMPROW rows[CHUNK];
    for (int i = 0; i < CHUNK; i++) rows[i] = rows_buffer + (size_t)i * crop_w * 3;
    if (y0 > 0) jpeg_skip_scanlines(&cinfo, (JDIMENSION)y0);
    size_t offset = (size_t)(left - (int)crop_x) * 3, row_bytes = (size_t)width * 3;
    while ((int)cinfo.output_scanline < top + height) {
        int y = (int)cinfo.output_scanline, wanted = top + height - y;
        int got = (int)jpeg_read_scanlines(&cinfo, rows, (JDIMENSION)(wanted < CHUNK ? wanted : CHUNK));
        for (int i = 0; i < got; i++)
            if (y + i >= top) memcpy(out + (size_t)(y + i - top) * row_bytes, rows[i] + offset, row_bytes);
    }
    /* The rows below are not needed, but their entropy-coded data is read (the IDCT of whole skipped
     * iMCU rows is not done), so that a file cut short below the box warns, hence fails, as it does for a
     * box that reaches the cut: a damaged file is skipped whatever its crop (issue 29). */
    int last = image_h - 1;
    if ((int)cinfo.output_scanline < last) jpeg_skip_scanlines(&cinfo, (JDIMENSION)(last - (int)cinfo.output_scanline));
    if ((int)cinfo.output_scanline < image_h) jpeg_read_scanlines(&cinfo, rows, 1);
    free(rows_buffer);
    rows_buffer = NULL;
    jpeg_abort_decompress(&cinfo);
    jpeg_destroy_decompress(&cinfo);
    return 0;
}
